/* The baseline of the watcher benchmark (benches/watcher.rs): a plain C proc connector
 * subscriber, as small as one can write it. It subscribes like zbridge's connector (8 MiB
 * SO_RCVBUFFORCE; a plain PROC_CN_MCAST_LISTEN, then the same with the fork|exec|exit event
 * mask on kernels that take one), prints "ready", then receives one datagram per recv() and
 * counts fork, exec and exit events until SIGTERM. At the end it prints
 * "events N lost L cpu_s S": S is its thread's CPU time (getrusage RUSAGE_THREAD, user + system)
 * since "ready", the same measure the Rust readers of the benchmark report.
 *
 * Built by the benchmark with `cc -O2`; not part of zbridge. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <linux/connector.h>
#include <linux/netlink.h>

#define PROC_CN_MCAST_LISTEN 1
#define PROC_CN_MCAST_IGNORE 2
#define PROC_EVENT_FORK 0x00000001u
#define PROC_EVENT_EXEC 0x00000002u
#define PROC_EVENT_EXIT 0x80000000u

static volatile sig_atomic_t stopping;

static void on_term(int sig) { (void)sig; stopping = 1; }

static double thread_cpu_seconds(void) {
    struct rusage u;
    getrusage(RUSAGE_THREAD, &u);
    return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6 + u.ru_stime.tv_sec +
           u.ru_stime.tv_usec / 1e6;
}

/* Sends PROC_CN_MCAST_LISTEN/IGNORE, with an event mask when `mask` is nonzero (6.6+). */
static int send_op(int fd, uint32_t op, uint32_t mask) {
    struct {
        struct nlmsghdr nl;
        struct cn_msg cn;
        uint32_t op;
        uint32_t mask;
    } __attribute__((packed)) msg;
    size_t payload = mask ? 8 : 4;
    memset(&msg, 0, sizeof msg);
    msg.nl.nlmsg_len = sizeof msg.nl + sizeof msg.cn + payload;
    msg.nl.nlmsg_type = NLMSG_DONE;
    msg.nl.nlmsg_pid = getpid();
    msg.cn.id.idx = CN_IDX_PROC;
    msg.cn.id.val = CN_VAL_PROC;
    msg.cn.len = payload;
    msg.op = op;
    msg.mask = mask;
    return send(fd, &msg, msg.nl.nlmsg_len, 0) < 0 ? -1 : 0;
}

int main(int argc, char **argv) {
    int use_mask = argc > 1 && strcmp(argv[1], "--mask") == 0;
    int fd = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR);
    if (fd < 0) { perror("socket"); return 1; }
    int size = 8 << 20;
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) < 0) perror("SO_RCVBUFFORCE");
    struct sockaddr_nl addr = {.nl_family = AF_NETLINK, .nl_groups = CN_IDX_PROC, .nl_pid = getpid()};
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("bind"); return 1; }
    if (send_op(fd, PROC_CN_MCAST_LISTEN, 0) < 0) { perror("subscribe"); return 1; }
    if (use_mask &&
        send_op(fd, PROC_CN_MCAST_LISTEN, PROC_EVENT_FORK | PROC_EVENT_EXEC | PROC_EVENT_EXIT) < 0) {
        perror("subscribe with mask");
        return 1;
    }
    struct timeval tv = {.tv_sec = 0, .tv_usec = 200000};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);

    printf("ready\n");
    fflush(stdout);
    double cpu0 = thread_cpu_seconds();
    unsigned long long events = 0, lost = 0;
    static char buf[64 * 1024] __attribute__((aligned(NLMSG_ALIGNTO)));
    while (!stopping) {
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == ENOBUFS) lost++;
            continue; /* EAGAIN (timeout), EINTR */
        }
        for (struct nlmsghdr *nl = (struct nlmsghdr *)buf; NLMSG_OK(nl, n); nl = NLMSG_NEXT(nl, n)) {
            struct cn_msg *cn = NLMSG_DATA(nl);
            if (cn->id.idx != CN_IDX_PROC || cn->len < 4) continue;
            uint32_t what;
            memcpy(&what, cn->data, sizeof what);
            if (what == PROC_EVENT_FORK || what == PROC_EVENT_EXEC || what == PROC_EVENT_EXIT) events++;
        }
    }
    double cpu = thread_cpu_seconds() - cpu0;
    send_op(fd, PROC_CN_MCAST_IGNORE, 0);
    printf("events %llu lost %llu cpu_s %.6f\n", events, lost, cpu);
    return 0;
}
