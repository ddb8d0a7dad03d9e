/*
 * What a wake-up and a cache line cost on this machine: the figures the watcher's coalescing
 * window and the tuple table's design rest on (BENCHMARKS.md, "Watcher" and "Programmer").
 * Not part of `cargo bench`; build and run by hand:
 *
 *   cc -O2 -pthread benches/wakeup_cost.c -o /tmp/wakeup_cost && /tmp/wakeup_cost
 *
 * 1. line: two threads pinned to CPUs 0 and 1 pass one cache line back and forth (an atomic
 *    int), 200,000 round trips: ns per one-way transfer.
 * 2. nanosleep: a thread sleeps 250 µs 4,000 times: its CPU time (getrusage) per wake-up.
 * 3. pipe: a thread blocked in read() is woken through a pipe every 250 µs, 4,000 times: the
 *    woken thread's CPU time per wake-up.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define ROUND_TRIPS 200000
#define WAKEUPS 4000

static _Alignas(64) atomic_int line;
static int pipefd[2];

static void pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static double now_ns(clockid_t clock)
{
	struct timespec t;

	clock_gettime(clock, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

static double thread_cpu_ns(void)
{
	struct rusage r;

	getrusage(RUSAGE_THREAD, &r);
	return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e9 +
	       (r.ru_utime.tv_usec + r.ru_stime.tv_usec) * 1e3;
}

static void *line_partner(void *arg)
{
	(void)arg;
	pin(1);
	for (int i = 0; i < ROUND_TRIPS; i++) {
		while (atomic_load(&line) != 1)
			;
		atomic_store(&line, 0);
	}
	return NULL;
}

static void *pipe_reader(void *arg)
{
	double *cpu = arg, start = thread_cpu_ns();
	char c;

	for (int i = 0; i < WAKEUPS; i++)
		if (read(pipefd[0], &c, 1) != 1)
			break;
	*cpu = thread_cpu_ns() - start;
	return NULL;
}

int main(void)
{
	struct timespec quarter_ms = { 0, 250000 };
	pthread_t t;
	double start, cpu = 0;

	pthread_create(&t, NULL, line_partner, NULL);
	pin(0);
	start = now_ns(CLOCK_MONOTONIC);
	for (int i = 0; i < ROUND_TRIPS; i++) {
		atomic_store(&line, 1);
		while (atomic_load(&line) != 0)
			;
	}
	printf("line: %.0f ns per one-way transfer between CPU 0 and 1\n",
	       (now_ns(CLOCK_MONOTONIC) - start) / ROUND_TRIPS / 2);
	pthread_join(t, NULL);

	start = thread_cpu_ns();
	for (int i = 0; i < WAKEUPS; i++)
		nanosleep(&quarter_ms, NULL);
	printf("nanosleep(250 us): %.1f us CPU per wake-up\n",
	       (thread_cpu_ns() - start) / WAKEUPS / 1e3);

	if (pipe(pipefd))
		return 1;
	pthread_create(&t, NULL, pipe_reader, &cpu);
	for (int i = 0; i < WAKEUPS; i++) {
		nanosleep(&quarter_ms, NULL);
		if (write(pipefd[1], "x", 1) != 1)
			return 1;
	}
	pthread_join(t, NULL);
	printf("pipe every 250 us: %.1f us CPU per wake-up of the reader\n", cpu / WAKEUPS / 1e3);
	return 0;
}
