#!/usr/bin/env bash
# The demo for a fresh machine (what `bash scripts/run` runs with no arguments, after
# scripts/setup): the shard plan of the project's own small story model for 3 nodes,
# then one chat turn answered by a 3-node cluster on this machine: as root, three
# dllama-node daemons in network namespaces (demo/netns_cluster.py: mDNS, election,
# the chat typed on a node that is not the root); otherwise 3 processes on loopback TCP
# (DLLAMA_DEMO_LOOPBACK=1 forces that).
#
#   bash demo/run_demo.sh                       # "Tell me a story about a dragon."
#   bash demo/run_demo.sh "Tell me a story about a fox who learns to swim."
#   DLLAMA_DEMO_NODES=2 DLLAMA_DEMO_TEMPERATURE=0.8 bash demo/run_demo.sh
#
# The model (demo/stories.gguf) is committed; when it is missing, demo/train.py
# rebuilds it first (about 9 minutes on one core, see demo/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."

ctl=.venv/bin/dllama-ctl
model=demo/stories.gguf
nodes=${DLLAMA_DEMO_NODES:-3}
temperature=${DLLAMA_DEMO_TEMPERATURE:-0}
message=${1:-Tell me a story about a dragon.}

if [ ! -f "$model" ]; then
  echo "== $model is missing: training it (demo/train.py)"
  .venv/bin/python demo/train.py -o "$model"
fi

echo "== the model: trained by this project on stories from its own grammar (demo/README.md)"
"$ctl" info --model "$model"
echo
echo "== the shard plan for $nodes nodes (query-head groups, FFN and vocabulary rows per node)"
"$ctl" plan --model "$model" --nodes "$nodes"
echo
if [ "$(id -u)" = 0 ] && command -v ip >/dev/null && [ -z "${DLLAMA_DEMO_LOOPBACK:-}" ]; then
  # as root: three dllama-node daemons in network namespaces, as on three boards
  exec .venv/bin/python demo/netns_cluster.py "$model" "$message" "$temperature"
fi
echo "== one chat turn on $nodes nodes of this machine (loopback TCP)"
echo "user> $message"
printf "assistant> "
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$ctl" generate --model "$model" --nodes "$nodes" --chat-format --prompt "$message" \
  --temperature "$temperature" --max-tokens 230 2>"$log" || { cat "$log" >&2; exit 1; }
echo
echo "== measured on each node, and the speed"
tail -n $((nodes + 2)) "$log"
