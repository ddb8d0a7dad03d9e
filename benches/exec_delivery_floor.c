/*
 * The floor under zbridge's enrolment latency on this machine: how long the kernel takes to
 * hand a process's exec to a proc connector subscriber that sleeps in recv(), and how much one
 * hand-off to a second sleeping thread adds. No zbridge code: a plain C subscriber, so that
 * BENCHMARKS.md ("Enrolment latency of new pods") can say what part of the agent's figure the
 * machine itself takes. Not part of `cargo bench`; build and run by hand, as root:
 *
 *   cc -O2 -pthread benches/exec_delivery_floor.c -o /tmp/exec_delivery_floor && /tmp/exec_delivery_floor
 *
 * A spawner thread (SCHED_OTHER, any CPU, like a kubelet) starts /bin/true 2,000 times at
 * 1,000 per second. The subscriber takes the time at each exec event it receives, minus the
 * event's timestamp_ns (the kernel's CLOCK_MONOTONIC when the exec happened, as zbridge's
 * metric), and passes the timestamp through a pipe to a second thread, which takes the time
 * again. Three set-ups, one after the other in one run, as zbridge's flags offer them: the
 * normal policy; SCHED_FIFO 1 (--realtime-priority); SCHED_FIFO 1 with both threads on the
 * last CPU (--hot-path-cpu). Only this run's own children's execs are counted.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/cn_proc.h>
#include <linux/connector.h>
#include <linux/netlink.h>

#define EXECS 2000
#define MAX_EVENTS 200000

extern char **environ;

struct setup {
	const char *name;
	int fifo;
	int pinned;
};

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int by_value(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void report(const char *what, uint64_t *v, int n)
{
	double sum = 0;
	qsort(v, (size_t)n, sizeof *v, by_value);
	for (int i = 0; i < n; i++)
		sum += (double)v[i];
	printf("  %-30s n=%d  p50 %6.1f  p90 %6.1f  p99 %7.1f  max %8.1f  mean %6.1f us\n", what, n,
	       v[n / 2] / 1e3, v[n * 9 / 10] / 1e3, v[n * 99 / 100] / 1e3, v[n - 1] / 1e3,
	       sum / n / 1e3);
}

/* The run's state: the spawner's children and every exec event seen, with both delays. */
static pid_t children[EXECS];
static volatile int spawning_done;
static pid_t event_pid[MAX_EVENTS];
static uint64_t event_ts[MAX_EVENTS], received[MAX_EVENTS], handed[MAX_EVENTS];
static int events;
static int handoff_pipe[2];

static void *spawner(void *arg)
{
	(void)arg;
	char *argv[] = {"/bin/true", NULL};
	uint64_t start = now_ns();
	for (int i = 0; i < EXECS; i++) {
		uint64_t due = start + (uint64_t)i * 1000000;
		for (uint64_t t = now_ns(); t < due; t = now_ns()) {
			struct timespec s = {0, (long)(due - t)};
			nanosleep(&s, NULL);
		}
		pid_t pid;
		if (posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ) == 0) {
			children[i] = pid;
			waitpid(pid, NULL, 0);
		}
	}
	usleep(100000); /* the last events arrive */
	spawning_done = 1;
	return NULL;
}

/* The second thread: the time each event's timestamp comes through the pipe. */
static void *handoff(void *arg)
{
	(void)arg;
	uint64_t msg[2];
	while (read(handoff_pipe[0], msg, sizeof msg) == sizeof msg) {
		if (msg[0] == UINT64_MAX)
			break;
		handed[msg[0]] = now_ns() - msg[1];
	}
	return NULL;
}

static void pin_to(int cpu)
{
	cpu_set_t set;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	sched_setaffinity(0, sizeof set, &set);
}

static int subscribe(void)
{
	int s = socket(AF_NETLINK, SOCK_DGRAM, NETLINK_CONNECTOR);
	struct sockaddr_nl addr = {.nl_family = AF_NETLINK, .nl_groups = CN_IDX_PROC};
	if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) != 0) {
		perror("proc connector (run as root)");
		exit(1);
	}
	struct __attribute__((packed)) {
		struct nlmsghdr header;
		struct cn_msg msg;
		enum proc_cn_mcast_op op;
	} listen = {0};
	listen.header.nlmsg_len = sizeof listen;
	listen.header.nlmsg_type = NLMSG_DONE;
	listen.msg.id.idx = CN_IDX_PROC;
	listen.msg.id.val = CN_VAL_PROC;
	listen.msg.len = sizeof listen.op;
	listen.op = PROC_CN_MCAST_LISTEN;
	send(s, &listen, sizeof listen, 0);
	struct timeval timeout = {0, 100000};
	setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
	return s;
}

static void *subscriber(void *arg)
{
	const struct setup *setup = arg;
	int last_cpu = (int)sysconf(_SC_NPROCESSORS_ONLN) - 1;
	if (setup->pinned)
		pin_to(last_cpu);
	if (setup->fifo) {
		struct sched_param p = {.sched_priority = 1};
		if (sched_setscheduler(0, SCHED_FIFO, &p) != 0)
			perror("SCHED_FIFO");
	}
	pthread_t second, spawn;
	pthread_create(&second, NULL, handoff, NULL); /* inherits policy and CPU */
	pthread_attr_t normal;
	pthread_attr_init(&normal);
	pthread_attr_setinheritsched(&normal, PTHREAD_EXPLICIT_SCHED);
	pthread_attr_setschedpolicy(&normal, SCHED_OTHER);
	struct sched_param zero = {0};
	pthread_attr_setschedparam(&normal, &zero);
	cpu_set_t all;
	CPU_ZERO(&all);
	for (int c = 0; c <= last_cpu; c++)
		CPU_SET(c, &all);
	pthread_attr_setaffinity_np(&normal, sizeof all, &all);

	int s = subscribe();
	events = 0;
	spawning_done = 0;
	memset(handed, 0, sizeof handed);
	pthread_create(&spawn, &normal, spawner, NULL);
	char buf[8192];
	while (!spawning_done) {
		ssize_t n = recv(s, buf, sizeof buf, 0);
		uint64_t t = now_ns();
		if (n <= 0)
			continue;
		struct cn_msg *msg = NLMSG_DATA((struct nlmsghdr *)buf);
		struct proc_event *ev = (struct proc_event *)msg->data;
		if (ev->what != PROC_EVENT_EXEC || events >= MAX_EVENTS)
			continue;
		event_pid[events] = ev->event_data.exec.process_tgid;
		event_ts[events] = ev->timestamp_ns;
		received[events] = t - ev->timestamp_ns;
		uint64_t msg_out[2] = {(uint64_t)events, ev->timestamp_ns};
		events++;
		if (write(handoff_pipe[1], msg_out, sizeof msg_out) != sizeof msg_out)
			perror("hand-off");
	}
	uint64_t end[2] = {UINT64_MAX, 0};
	if (write(handoff_pipe[1], end, sizeof end) != sizeof end)
		perror("hand-off");
	pthread_join(second, NULL);
	pthread_join(spawn, NULL);
	close(s);
	return NULL;
}

static int is_child(pid_t pid)
{
	for (int i = 0; i < EXECS; i++)
		if (children[i] == pid)
			return 1;
	return 0;
}

int main(void)
{
	static const struct setup setups[] = {
		{"SCHED_OTHER, any CPU", 0, 0},
		{"SCHED_FIFO 1, any CPU", 1, 0},
		{"SCHED_FIFO 1, both threads on the last CPU", 1, 1},
	};
	static uint64_t got[EXECS], after[EXECS];
	if (pipe(handoff_pipe) != 0) {
		perror("pipe");
		return 1;
	}
	printf("exec -> a sleeping proc connector subscriber, %d execs at 1,000/s per set-up\n",
	       EXECS);
	for (size_t i = 0; i < sizeof setups / sizeof setups[0]; i++) {
		pthread_t t;
		pthread_create(&t, NULL, subscriber, (void *)&setups[i]);
		pthread_join(t, NULL);
		int n = 0;
		for (int e = 0; e < events && n < EXECS; e++) {
			if (!is_child(event_pid[e]) || handed[e] == 0)
				continue;
			got[n] = received[e];
			after[n] = handed[e];
			n++;
		}
		printf("%s\n", setups[i].name);
		if (n == 0) {
			printf("  no exec of this run's children was seen\n");
			continue;
		}
		report("subscriber has it", got, n);
		report("after one hand-off", after, n);
	}
	return 0;
}
