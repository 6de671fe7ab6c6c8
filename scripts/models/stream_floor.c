/*
 * The floor under moving 1 GiB through one loopback TCP stream: a sender writes it from
 * memory in 128 KiB writes, a receiver reads it in 64 KiB reads into one buffer and drops it
 * (no protocol, no guest memory, no placement). Prints each thread's CPU time and the wall
 * time: what the kernel alone costs the two ends of a migration stream on this machine.
 *
 *   cc -O2 -pthread -o /tmp/stream_floor scripts/models/stream_floor.c && /tmp/stream_floor
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TOTAL (1L << 30)

static int tx, rx;
static double rx_cpu_ms;

static double thread_cpu_ms(void)
{
	struct rusage r;
	getrusage(RUSAGE_THREAD, &r);
	return (r.ru_utime.tv_sec + r.ru_stime.tv_sec) * 1e3 + (r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e3;
}

static void *receiver(void *unused)
{
	char *buf = malloc(1 << 16);
	long got = 0;
	double c0 = thread_cpu_ms();
	while (got < TOTAL) {
		long n = read(rx, buf, 1 << 16);
		if (n <= 0) {
			perror("read");
			exit(1);
		}
		got += n;
	}
	rx_cpu_ms = thread_cpu_ms() - c0;
	return unused;
}

int main(void)
{
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in ad = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof ad;
	if (bind(l, (void *)&ad, sizeof ad) || getsockname(l, (void *)&ad, &len) || listen(l, 1)) {
		perror("listen");
		return 1;
	}
	tx = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(tx, (void *)&ad, sizeof ad)) {
		perror("connect");
		return 1;
	}
	rx = accept(l, NULL, NULL);
	setsockopt(tx, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	char *src = malloc(128 << 10);
	memset(src, 7, 128 << 10);
	pthread_t t;
	pthread_create(&t, NULL, receiver, NULL);
	struct timespec w0, w1;
	clock_gettime(CLOCK_MONOTONIC, &w0);
	double c0 = thread_cpu_ms();
	for (long sent = 0; sent < TOTAL;) {
		long n = write(tx, src, 128 << 10);
		if (n <= 0) {
			perror("write");
			return 1;
		}
		sent += n;
	}
	double tx_cpu_ms = thread_cpu_ms() - c0;
	pthread_join(t, NULL);
	clock_gettime(CLOCK_MONOTONIC, &w1);
	printf("1 GiB over loopback TCP: %.0f ms wall; sender %.0f ms CPU, receiver %.0f ms CPU\n",
	       (w1.tv_sec - w0.tv_sec) * 1e3 + (w1.tv_nsec - w0.tv_nsec) / 1e6, tx_cpu_ms, rx_cpu_ms);
	return 0;
}
