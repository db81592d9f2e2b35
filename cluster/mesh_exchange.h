/* One all-gather step of the cluster's mesh (cluster/sync_tcp.py) without the GIL and
 * without Python between system calls: send this node's frame to every link and receive
 * one frame of the same size from every link, interleaved, never blocking on a send (two
 * nodes sending large batches at each other at once would otherwise both stall on full
 * socket buffers).
 *
 *   fds[j], node[j]   link j's socket (non-blocking calls are used on it) and the node it
 *                     reaches; node[j]'s frame is received at frames + node[j] * stride
 *   out, size         this node's frame (header + payload) and its size in bytes
 *   timeout_ms        how long to wait for any progress before giving up
 *   spin_ns           how long to poll without sleeping before the first sleep
 *
 * A received frame's first DL_FRAME_HEADER bytes must equal out's (the same kind and
 * length); anything else stops the step so that the caller can read what came instead.
 * Returns DL_MESH_OK, or a DL_MESH_* failure with the link, errno and bytes received
 * from that link in *fail. Linux and other POSIX systems; header-only, included by
 * cluster/_mesh_exchange.pyx (the compiled module dllama_node.cluster._mesh_exchange).
 */
#ifndef DL_MESH_EXCHANGE_H
#define DL_MESH_EXCHANGE_H

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#ifndef MSG_NOSIGNAL
#define MSG_NOSIGNAL 0
#endif

#define DL_FRAME_HEADER 16
#define DL_MESH_MAX_LINKS 256

enum {
    DL_MESH_OK = 0,
    DL_MESH_CLOSED = 1,        /* the peer closed the connection */
    DL_MESH_RECV_ERROR = 2,    /* recv failed: errno */
    DL_MESH_SEND_ERROR = 3,    /* send failed: errno */
    DL_MESH_RECV_TIMEOUT = 4,  /* nothing moved for timeout_ms while receiving */
    DL_MESH_SEND_TIMEOUT = 5,  /* nothing moved for timeout_ms while only sending was left */
    DL_MESH_HEADER = 6,        /* the frame's header is not ours: read the rest in Python */
};

typedef struct {
    int link;       /* index into fds */
    int err;        /* errno, for the *_ERROR failures */
    int64_t got;    /* bytes received from that link */
} dl_mesh_failure;

static int64_t dl_mesh_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int dl_mesh_exchange(int n_links, const int *fds, const int *node, const uint8_t *out,
                            int64_t size, uint8_t *frames, int64_t stride, int timeout_ms,
                            int64_t spin_ns, dl_mesh_failure *fail) {
    int64_t sent[DL_MESH_MAX_LINKS], got[DL_MESH_MAX_LINKS];
    struct pollfd pfd[DL_MESH_MAX_LINKS];
    int links[DL_MESH_MAX_LINKS];
    int pending = 0;
    for (int j = 0; j < n_links; j++) {
        sent[j] = got[j] = 0;
        ssize_t n = send(fds[j], out, (size_t)size, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            fail->link = j; fail->err = errno; fail->got = 0;
            return DL_MESH_SEND_ERROR;
        }
        if (n > 0) sent[j] = n;
        pending++;
    }
    int64_t spin_until = spin_ns > 0 ? dl_mesh_now_ns() + spin_ns : 0;
    while (pending) {
        int n_poll = 0;
        for (int j = 0; j < n_links; j++) {
            short events = (got[j] < size ? POLLIN : 0) | (sent[j] < size ? POLLOUT : 0);
            if (!events) continue;
            pfd[n_poll].fd = fds[j]; pfd[n_poll].events = events; pfd[n_poll].revents = 0;
            links[n_poll++] = j;
        }
        int ready;
        do {
            int wait_ms = spin_until && dl_mesh_now_ns() < spin_until ? 0 : timeout_ms;
            ready = poll(pfd, (nfds_t)n_poll, wait_ms);
            if (ready == 0 && wait_ms == 0) continue;     /* still spinning */
            break;
        } while (1);
        if (ready < 0) {
            if (errno == EINTR) continue;
            fail->link = links[0]; fail->err = errno; fail->got = got[links[0]];
            return DL_MESH_RECV_ERROR;
        }
        if (ready == 0) {
            for (int k = 0; k < n_poll; k++) {               /* name a link still receiving */
                int j = links[k];
                if (got[j] < size) {
                    fail->link = j; fail->err = 0; fail->got = got[j];
                    return DL_MESH_RECV_TIMEOUT;
                }
            }
            fail->link = links[0]; fail->err = 0; fail->got = got[links[0]];
            return DL_MESH_SEND_TIMEOUT;
        }
        for (int k = 0; k < n_poll; k++) {
            int j = links[k];
            short re = pfd[k].revents;
            if (!re) continue;
            if (sent[j] < size && (re & (POLLOUT | POLLERR | POLLHUP))) {
                ssize_t n = send(fds[j], out + sent[j], (size_t)(size - sent[j]),
                                 MSG_DONTWAIT | MSG_NOSIGNAL);
                if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                    fail->link = j; fail->err = errno; fail->got = got[j];
                    return DL_MESH_SEND_ERROR;
                }
                if (n > 0) sent[j] += n;
            }
            if (got[j] < size && (re & (POLLIN | POLLERR | POLLHUP))) {
                uint8_t *frame = frames + (int64_t)node[j] * stride;
                ssize_t n = recv(fds[j], frame + got[j], (size_t)(size - got[j]), MSG_DONTWAIT);
                if (n == 0) {
                    fail->link = j; fail->err = 0; fail->got = got[j];
                    return DL_MESH_CLOSED;
                }
                if (n < 0) {
                    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
                    fail->link = j; fail->err = errno; fail->got = got[j];
                    return DL_MESH_RECV_ERROR;
                }
                int64_t before = got[j];
                got[j] += n;
                if (before < DL_FRAME_HEADER && got[j] >= DL_FRAME_HEADER
                        && memcmp(frame, out, DL_FRAME_HEADER) != 0) {
                    fail->link = j; fail->err = 0; fail->got = got[j];
                    return DL_MESH_HEADER;
                }
            }
            if (got[j] >= size && sent[j] >= size) pending--;
        }
    }
    return DL_MESH_OK;
}

#endif /* DL_MESH_EXCHANGE_H */
