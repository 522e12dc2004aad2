/* The readiness lag on a llama-server child's own clock, for bench/swap.py.

   LD_PRELOAD'ed into the child, it stamps the moment the child starts to write
   its "ready" line to its supervisor (fprintf) and the moment it starts to read
   the next chat request (recv), and appends "<pid> <ready ns> <request ns>" to
   $READYLAG_FILE.  It runs inside the child and stops nothing, unlike a tracer
   (strace stops the child at every traced call and stamps it when it gets round
   to it).  Both are entries of calls: the bytes leave a few microseconds after
   the first stamp, and the request was waiting at the second. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile long long ready_ns = 0;  /* set by the main thread, read by HTTP threads */
static volatile int reported = 0;

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* llama-server's notify_to_router: fprintf(stdout, "\n%s%s\n", prefix, json) */
int fprintf(FILE *stream, const char *format, ...) {
    va_list args, peek;
    va_start(args, format);
    if (stream == stdout && !ready_ns && strcmp(format, "\n%s%s\n") == 0) {
        va_copy(peek, args);
        const char *prefix = va_arg(peek, const char *);
        const char *json = va_arg(peek, const char *);
        static const char ready[] = "{\"state\":\"ready\"";
        if (strcmp(prefix, "cmd_child_to_router:state:") == 0
            && strncmp(json, ready, sizeof ready - 1) == 0)
            ready_ns = now_ns();
        va_end(peek);
    }
    int written = vfprintf(stream, format, args);
    va_end(args);
    return written;
}

ssize_t recv(int fd, void *buf, size_t len, int flags) {
    static ssize_t (*real)(int, void *, size_t, int) = NULL;
    if (!real) real = (ssize_t (*)(int, void *, size_t, int))dlsym(RTLD_NEXT, "recv");
    long long entered = ready_ns && !reported ? now_ns() : 0;
    ssize_t n = real(fd, buf, len, flags);
    static const char request[] = "POST /v1/chat/completions ";
    if (entered && n >= (ssize_t)sizeof request - 1
        && memcmp(buf, request, sizeof request - 1) == 0) {
        reported = 1;
        const char *path = getenv("READYLAG_FILE");
        if (path) {
            char line[96];
            int k = snprintf(line, sizeof line, "%d %lld %lld\n", getpid(), ready_ns, entered);
            int out = open(path, O_WRONLY | O_APPEND | O_CREAT, 0644);
            if (out >= 0) { if (write(out, line, k) < 0) {} close(out); }
        }
    }
    return n;
}
