"""A story grammar: short, readable children's stories and chat turns asking for them.

The demo model is trained on nothing else, so everything it can say is written here,
by the project, and may ship with it. A story has a hero (a kind of animal or child, an
adjective, a name, he or she), often a friend, and one of five plots (a lost thing, a
journey, a storm, sharing, learning a skill); every sentence of a plot has several
wordings. Pronouns agree with the character they stand for, and a story asked for
"about a dragon named Tom" has a dragon named Tom in it.

    rng = random.Random(0)
    story = make_story(rng)                  # Story: .text, .hero, .plot
    turn = make_chat_turn(rng)               # ChatTurn: .user, .assistant
    vocabulary()                             # every word the grammar can write, lower case

Stories use only "." and "," as punctuation, and every one ends with "The end."
Prompts may end with "?".
"""
from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterator, List, Optional, Tuple

# -- the cast ------------------------------------------------------------------------

# kind -> (gender or None for either, where it lives, what it can do)
KINDS: Dict[str, Tuple[Optional[str], Tuple[str, ...], Tuple[str, ...]]] = {
    "dragon": (None, ("in a big cave on a hill", "in a dark cave near the mountains"),
               ("fly over the hills", "make warm fire")),
    "cat": (None, ("in a warm house in the village", "in a small house with a red door"),
            ("climb tall trees", "chase little bugs")),
    "dog": (None, ("in a small house by the farm", "in a little house near the park"),
            ("run very fast", "dig in the garden")),
    "fox": (None, ("in a hole under an old tree", "in a cozy den in the forest"),
            ("hide in the tall grass", "run through the forest")),
    "rabbit": (None, ("in a hole in the green field", "in a little burrow under a hill"),
               ("jump very high", "eat fresh carrots")),
    "bear": (None, ("in a cave in the forest", "in a big den near the river"),
             ("find sweet honey", "catch fish in the river")),
    "owl": (None, ("in a tall tree in the forest", "in an old tree near the village"),
            ("see in the dark", "fly at night")),
    "mouse": (None, ("in a tiny hole in the wall", "in a little nest under the floor"),
              ("find bits of cheese", "run along the wall")),
    "frog": (None, ("in a pond near the river", "on a big leaf in the pond"),
             ("jump from leaf to leaf", "sing at night")),
    "duck": (None, ("by a pond near the farm", "in a nest by the lake"),
             ("swim in the lake", "splash in the water")),
    "turtle": (None, ("by a quiet lake", "near a sandy beach"),
               ("swim in the sea", "walk very slowly")),
    "robot": (None, ("in a small house in the town", "in an old shed behind a farm"),
              ("fix broken toys", "count the stars")),
    "girl": ("she", ("in a small house in the village", "in a little house by the sea"),
             ("draw pretty pictures", "sing songs")),
    "boy": ("he", ("in a small house in the village", "in a little house near the forest"),
            ("build things with wood", "play ball")),
}
NAMES = {"he": ("Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Tim", "Finn", "Oscar", "Hugo"),
         "she": ("Lily", "Mia", "Anna", "Sara", "Lucy", "Emma", "Rosa", "Ella", "Nora", "Ivy")}
# friends have names of their own, so a story never has two characters of one name
FRIEND_NAMES = {"he": ("Pip", "Bob", "Ted", "Gus", "Ned", "Rex"),
                "she": ("Kim", "Zoe", "Amy", "Bea", "Joy", "Dot")}
ADJECTIVES = ("little", "big", "brave", "kind", "shy", "happy", "old", "young", "clever",
              "gentle", "funny", "curious", "small", "friendly")
CHILD_ADJECTIVES = tuple(a for a in ADJECTIVES if a not in ("old", "big"))
TRAITS = ("kind", "clever", "funny", "gentle", "brave", "friendly", "curious")
HOBBIES = ("play in the sun", "sing happy songs", "look at the stars", "run in the grass",
           "pick flowers", "read old books", "play with friends", "watch the clouds")
PLACES = ("forest", "village", "valley", "meadow", "town", "land")
PLACE_ADJECTIVES = ("quiet", "green", "sunny", "small", "faraway", "peaceful")

PRONOUNS = {"he": {"he": "he", "him": "him", "his": "his", "himself": "himself"},
            "she": {"he": "she", "him": "her", "his": "her", "himself": "herself"}}

# lost thing plot
COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "white")
THINGS = ("ball", "hat", "kite", "scarf", "key", "book", "shell", "bell", "toy boat", "box")
SEARCH_SPOTS = ("under a big leaf", "behind a rock", "in the tall grass", "next to the river",
                "under the bridge", "near the old well", "inside a hollow log", "by the fence")
# journey plot: sight -> what it looks like when they arrive
SIGHTS = {
    "sea": ("The water was blue, and the waves were big and white.",
            "The sea was so big that it touched the sky."),
    "mountain": ("From the top, they could see the whole valley.",
                 "The mountain was so high that the clouds were below them."),
    "castle": ("The castle had tall towers and a big golden door.",
               "The castle was old, and flags waved from its towers."),
    "waterfall": ("The water fell from the rocks and made a rainbow.",
                  "The waterfall was loud, and the air was cool and fresh."),
}
FOODS = ("apples", "bread", "berries", "cookies", "cheese")
# share plot
TREATS = ("cake", "pie", "apple pie", "loaf of bread", "pizza")
MEETING_SPOTS = ("garden gate", "old tree", "river", "road", "window")
# learn plot: skill -> (how trying fails, how it works in the end)
SKILLS = {
    "swim": ("{He} tried, but the water was cold and deep.",
             "{He} swam all the way across the pond."),
    "fly a kite": ("{He} tried, but the kite fell to the ground again and again.",
                   "The kite flew high up in the sky."),
    "climb a tree": ("{He} tried, but {he} slipped and fell on the soft grass.",
                     "{He} climbed all the way to the top."),
    "ride a bike": ("{He} tried, but the bike wobbled and fell over.",
                    "{He} rode the bike down the road and back."),
    "whistle": ("{He} tried, but only air came out.",
                "{He} whistled a happy little song."),
}

# -- sentences -----------------------------------------------------------------------
# Fields: {N} {hero} (the hero with article and adjective: "a little dragon") {K} the
# hero's kind, {home}, {hobby}, {trait}; {N2} {friend} {K2} for the friend; {he} {him}
# {his} {himself} (and capitalised {He} {His}) for the hero, {he2} {him2} {his2} {He2}
# for the friend; plot fields as named. A line is one sentence; a choice is a tuple.

INTRO = ("Once upon a time, there was {hero} named {N}.",
         "Once upon a time, in a {padj} {place}, there lived {hero} named {N}.",
         "There once was {hero} called {N}.",
         "Long ago, in a {padj} {place}, there was {hero} named {N}.")
HOME = ("{N} lived {home}.", "{He} lived {home}.")
TRAIT = ("{He} liked to {hobby}.", "{N} was very {trait}, and everyone liked {him}.",
         "Every day, {N} liked to {hobby}.", "{He} could {ability}.")
MEET = ("One day, {N} met {friend} named {N2}.",
        "One day, {N} saw {friend} named {N2}.")

PLOTS: Dict[str, Tuple[Tuple[str, ...], ...]] = {
    "lost": (
        MEET,
        ("{N2} was very sad.", "{N2} looked very sad.", "{N2} was crying."),
        ("{He2} had lost {his2} {color} {thing}.", "{He2} could not find {his2} {color} {thing}."),
        ("{N} wanted to help {him2}.", "{N} said that {he} would help."),
        ("First, they looked {spot1}, but the {thing} was not there.",
         "They looked {spot1}, but they did not find it."),
        ("At last, they found the {thing} {spot2}.", "Then they found the {thing} {spot2}."),
        ("{N2} was so happy that {he2} gave {N} a big hug.",
         "{N2} smiled and said thank you to {N}."),
        ("From that day on, {N} and {N2} were best friends.",
         "After that, {N} and {N2} played together every day."),
    ),
    "journey": (
        ("One morning, {N} wanted to see the {sight}.",
         "One day, {N} decided to visit the {sight}."),
        ("{He} put some {food} in {his} bag.", "{He} packed some {food} and a little map."),
        ("The way was long, and the sun was hot.",
         "The path went over the hills and through the forest."),
        ("On the way, {he} met {friend} named {N2}.",
         "On the way, {N} met {friend} named {N2}."),
        ("{N2} knew the way to the {sight}, so they walked together.",
         "{N2} wanted to see the {sight} too, so they went together."),
        ("When they got to the {sight}, {N} was amazed.", "At last, they saw the {sight}."),
        ("{sight_view}",),
        ("They sat down and shared the {food}.", "They ate the {food} and rested."),
        ("In the evening, {N} went home, tired and happy.",
         "When the sun went down, {N} went home with a big smile."),
    ),
    "storm": (
        ("One night, a big storm came to the {place}.",
         "One evening, dark clouds came over the {place}."),
        ("The wind was loud, and the rain fell hard.", "Thunder boomed, and the rain fell hard."),
        ("{N} was scared and hid under {his} blanket.", "{N} was afraid of the storm."),
        ("Then {he} heard a knock at the door.", "Then {he} heard a small voice outside."),
        ("It was {friend} named {N2}, wet and cold.",
         "It was {friend} named {N2}, and {he2} was cold."),
        ("{N} opened the door and let {N2} in.", "{N} let {N2} come inside."),
        ("{He} gave {N2} a warm blanket and a cup of milk.",
         "They sat by the fire and told stories."),
        ("Soon they were not scared anymore.", "Soon the storm did not seem so bad."),
        ("In the morning, the sun came out, and the sky was blue.",
         "In the morning, the storm was gone."),
        ("{N} and {N2} went out to play in the puddles.",
         "From that day on, {N} was not afraid of storms."),
    ),
    "share": (
        ("One day, {N} baked a big {treat}.", "One morning, {N} made a big {treat}."),
        ("It smelled so good that {he} wanted to eat it all.",
         "It looked so good that {he} wanted to keep it all."),
        ("Then {N} saw {friend} named {N2} by the {meeting}.",
         "Then {he} met {friend} named {N2} near the {meeting}."),
        ("{N2} looked very hungry.", "{N2} had nothing to eat."),
        ("{N} thought for a moment.", "{N} thought about it."),
        ("Then {he} gave half of the {treat} to {N2}.", "Then {he} shared the {treat} with {N2}."),
        ("{N2} said thank you with a big smile.", "{N2} was very happy."),
        ("They ate together and laughed all afternoon.", "They ate together under a tree."),
        ("{N} learned that sharing makes everyone happy.",
         "{N} felt warm inside, because sharing is good."),
    ),
    "learn": (
        ("{N} wanted to learn how to {skill}.", "One day, {N} wanted to {skill}."),
        ("{skill_fail}",),
        ("{N} felt sad and wanted to give up.", "{N} was sad, but {he} did not give up."),
        ("Then {friend} named {N2} came by.", "Then {he} met {friend} named {N2}."),
        ("{N2} showed {him} how to do it, step by step.",
         "{N2} helped {him} and said {he} could do it."),
        ("{N} tried one more time.", "{N} tried again."),
        ("This time, {he} did it.", "This time, it worked."),
        ("{skill_win}",),
        ("{N} was very proud of {himself}.", "{N} was so happy and proud."),
        ("{He} thanked {N2} for {his2} help.", "{He} said thank you to {N2}."),
    ),
}
THE_END = "The end."

# -- chat prompts --------------------------------------------------------------------
# Fields: {a_K} "a dragon", {a_AK} "a brave dragon", {a_K2} for the friend, {N}, and
# {about} (what the plot is about, see PLOT_ABOUT).
STORY_REQUESTS = (     # repeated entries are drawn more often
    "Tell me a story about {a_K}.", "Tell me a story about {a_K}.",
    "Tell me a story about {a_AK}.", "Can you tell me a story about {a_K}?",
    "Please tell me a story about {a_K}.", "Tell me a short story about {a_K}.",
    "Write a story about {a_K}.", "I would like a story about {a_K}.",
    "Tell me a story about {a_K} named {N}.", "Tell me a story about {a_K} named {N}.",
    "Write a story about {a_K} named {N}.",
    "Tell me a story about {a_K} and {a_K2}.", "Tell me a story about {a_K} and {a_K2}.",
    "Tell me a story about {a_K} who {about}.", "Tell me a story about {a_K} who {about}.",
    "Tell me a story about {a_K} who {about}.",
    "Tell me a story.", "Tell me a bedtime story.", "Can you tell me a story?",
)
PLOT_ABOUT = {"lost": ("helps a friend", "helps a friend find a {thing}"),
              "journey": ("goes to the {sight}",),
              "storm": ("is afraid of a storm",),
              "share": ("bakes {a_treat}", "shares {a_treat}"),
              "learn": ("learns to {skill}",)}
SMALL_TALK = (
    (("Hello.", "Hi.", "Hello!", "Hi there."),
     "Hello. I am a small story model. Ask me for a story about an animal, "
     "and I will tell you one."),
    (("Who are you?", "What are you?"),
     "I am a small model that tells short stories. "
     "I learned from stories made by a simple grammar."),
    (("Thank you.", "Thanks."),
     "You are welcome. Ask me for another story any time."),
)


@dataclass(frozen=True)
class Story:
    text: str
    plot: str
    hero: Dict[str, str]        # the fields of the hero: N, K, A, he ...
    fields: Dict[str, str]


@dataclass(frozen=True)
class ChatTurn:
    user: str
    assistant: str

    def messages(self) -> List[Dict[str, str]]:
        return [{"role": "user", "content": self.user},
                {"role": "assistant", "content": self.assistant}]


def article(phrase: str) -> str:
    """'a' or 'an' before phrase."""
    return "an" if phrase[:1].lower() in "aeiou" else "a"


def _a(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def _character(rng: random.Random, kind: Optional[str] = None, name: Optional[str] = None,
               adjective: Optional[str] = None, not_kind: Optional[str] = None,
               names: Dict[str, Tuple[str, ...]] = NAMES) -> Dict[str, str]:
    if kind is None:
        kind = rng.choice([k for k in KINDS if k != not_kind])
    gender = KINDS[kind][0]
    if name is not None:
        gender = "he" if name in names["he"] else "she"
    elif gender is None:
        gender = rng.choice(("he", "she"))
    name = name or rng.choice(names[gender])
    if adjective is None:
        adjective = rng.choice(ADJECTIVES if KINDS[kind][0] is None else CHILD_ADJECTIVES)
    c = {"N": name, "K": kind, "A": adjective, "gender": gender}
    c.update(PRONOUNS[gender])
    return c


def _fields(rng: random.Random, hero: Dict[str, str], friend: Dict[str, str], plot: str,
            plot_fields: Dict[str, str]) -> Dict[str, str]:
    f = {k: v for k, v in hero.items()}
    f["hero"] = _a(f"{hero['A']} {hero['K']}")
    f["home"] = rng.choice(KINDS[hero["K"]][1])
    f["ability"] = rng.choice(KINDS[hero["K"]][2])
    f["hobby"] = rng.choice(HOBBIES)
    f["trait"] = rng.choice(TRAITS)
    f["place"] = rng.choice(PLACES)
    f["padj"] = rng.choice(PLACE_ADJECTIVES)
    f.update({"N2": friend["N"], "K2": friend["K"], "he2": friend["he"], "him2": friend["him"],
              "his2": friend["his"], "friend": _a(f"{friend['A']} {friend['K']}")})
    spots = rng.sample(SEARCH_SPOTS, 2)
    f.update({"color": rng.choice(COLORS), "thing": rng.choice(THINGS), "spot1": spots[0],
              "spot2": spots[1], "sight": rng.choice(list(SIGHTS)), "food": rng.choice(FOODS),
              "treat": rng.choice(TREATS), "meeting": rng.choice(MEETING_SPOTS),
              "skill": rng.choice(list(SKILLS))})
    f.update(plot_fields)
    f["a_treat"] = _a(f["treat"])
    f["sight_view"] = rng.choice(SIGHTS[f["sight"]])
    fail, win = SKILLS[f["skill"]]
    f["skill_fail"], f["skill_win"] = fail, win
    return f


def _render(template: str, fields: Dict[str, str]) -> str:
    caps = {k[0].upper() + k[1:]: v[0].upper() + v[1:] for k, v in fields.items()
            if v and k[0].islower()}
    text = template
    for _ in range(2):          # sight_view / skill_* hold fields themselves
        text = text.format(**fields, **caps)
    return text[0].upper() + text[1:]


def make_story(rng: random.Random, kind: Optional[str] = None, name: Optional[str] = None,
               adjective: Optional[str] = None, plot: Optional[str] = None,
               friend_kind: Optional[str] = None,
               plot_fields: Optional[Dict[str, str]] = None) -> Story:
    """One story; anything not given is drawn from rng."""
    hero = _character(rng, kind, name, adjective)
    friend = _character(rng, friend_kind, not_kind=hero["K"], names=FRIEND_NAMES)
    plot = plot or rng.choice(sorted(PLOTS))
    fields = _fields(rng, hero, friend, plot, plot_fields or {})
    lines = [rng.choice(INTRO)]
    if not lines[0].startswith("Long ago") or rng.random() < 0.5:
        lines.append(rng.choice(HOME))
    lines.append(rng.choice(TRAIT))
    lines.extend(rng.choice(choice) for choice in PLOTS[plot])
    sentences = [_render(t, fields) for t in lines] + [THE_END]
    return Story(" ".join(sentences), plot, hero, fields)


def make_chat_turn(rng: random.Random, small_talk: float = 0.05) -> ChatTurn:
    """A user message and the assistant's answer: mostly a story request and a story
    that honours it, sometimes small talk."""
    if rng.random() < small_talk:
        prompts, answer = rng.choice(SMALL_TALK)
        return ChatTurn(rng.choice(prompts), answer)
    request = rng.choice(STORY_REQUESTS)
    plot = rng.choice(sorted(PLOTS))
    kind = rng.choice(sorted(KINDS))
    friend_kind = rng.choice([k for k in sorted(KINDS) if k != kind])
    about = rng.choice(PLOT_ABOUT[plot])
    story = make_story(rng, kind=kind, plot=plot, friend_kind=friend_kind,
                       name=None, adjective=None)
    f = story.fields
    fields = {"a_K": _a(kind), "a_AK": _a(f"{f['A']} {kind}"), "a_K2": _a(friend_kind),
              "N": f["N"], "about": about.format(**f)}
    return ChatTurn(request.format(**fields), story.text)


def chat_turns(seed: int) -> Iterator[ChatTurn]:
    """An endless, reproducible stream of chat turns."""
    rng = random.Random(seed)
    while True:
        yield make_chat_turn(rng)


def stories(seed: int) -> Iterator[str]:
    """An endless, reproducible stream of story texts."""
    rng = random.Random(seed)
    while True:
        yield make_story(rng).text


# -- what the grammar can say --------------------------------------------------------
_WORD = re.compile(r"[A-Za-z]+")


def words_of(text: str) -> List[str]:
    """The words of a text, lower case (punctuation and field names dropped)."""
    text = re.sub(r"\{[A-Za-z_0-9]+\}", " ", text)
    return [w.lower() for w in _WORD.findall(text)]


def _all_strings() -> Iterator[str]:
    for kind, (_, homes, abilities) in KINDS.items():
        yield kind
        yield from homes
        yield from abilities
    for group in (*NAMES.values(), *FRIEND_NAMES.values(), ADJECTIVES, TRAITS, HOBBIES, PLACES,
                  PLACE_ADJECTIVES, COLORS, THINGS, SEARCH_SPOTS, FOODS, TREATS,
                  MEETING_SPOTS, INTRO, HOME, TRAIT, MEET, STORY_REQUESTS, (THE_END,)):
        yield from group
    for p in PRONOUNS.values():
        yield from p.values()
    for sight, views in SIGHTS.items():
        yield sight
        yield from views
    for skill, lines in SKILLS.items():
        yield skill
        yield from lines
    for plot in PLOTS.values():
        for choice in plot:
            yield from choice
    for abouts in PLOT_ABOUT.values():
        yield from abouts
    for prompts, answer in SMALL_TALK:
        yield from prompts
        yield answer
    yield "a an"


def vocabulary() -> FrozenSet[str]:
    """Every word the grammar can write, lower case."""
    out = set()
    for s in _all_strings():
        out.update(words_of(s))
    return frozenset(out)


def punctuation() -> FrozenSet[str]:
    """Every non-letter, non-space character the grammar writes."""
    out = set()
    for s in _all_strings():
        out.update(c for c in re.sub(r"\{[A-Za-z_0-9]+\}", "", s)
                   if c in string.punctuation)
    return frozenset(out)
