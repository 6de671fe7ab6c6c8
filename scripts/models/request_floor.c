/*
 * The floor under a postcopy page request on this machine: what two wake-ups across a
 * loopback socket cost, without userfaultfd, page tables or migration code. A "fault thread"
 * writes a 24-byte request on one connection (the return path) and waits for a 4 KiB answer
 * on a second one (the preempt channel); a "source" thread answers each request. Optionally a
 * bulk TCP transfer runs beside it (a sender and a receiver thread, as the background push
 * keeps both cores busy in the kernel), and optionally the requester spins on the answer
 * instead of sleeping.
 *
 *   cc -O2 -pthread -o /tmp/request_floor scripts/models/request_floor.c
 *   /tmp/request_floor tcp|unix [BULK_WRITE_BYTES [SPIN_US]]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define ROUNDS 20000
#define ANSWER 4096

static int req_in, ans_out, bulk_tx, bulk_rx;
static long bulk_write;

static long now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void read_all(int fd, char *p, int n)
{
	while (n > 0) {
		int r = read(fd, p, n);
		if (r <= 0) {
			perror("read");
			exit(1);
		}
		p += r;
		n -= r;
	}
}

static void pair(int unix_, int *a, int *b)
{
	if (unix_) {
		int sv[2];
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv)) {
			perror("socketpair");
			exit(1);
		}
		*a = sv[0];
		*b = sv[1];
		return;
	}
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in ad = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof ad;
	if (bind(l, (void *)&ad, sizeof ad) || getsockname(l, (void *)&ad, &len) || listen(l, 1)) {
		perror("listen");
		exit(1);
	}
	*a = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(*a, (void *)&ad, sizeof ad)) {
		perror("connect");
		exit(1);
	}
	*b = accept(l, NULL, NULL);
	close(l);
	setsockopt(*a, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	setsockopt(*b, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void *source(void *unused)
{
	char buf[ANSWER];
	memset(buf, 1, sizeof buf);
	for (int i = 0; i < ROUNDS; i++) {
		read_all(req_in, buf, 24);
		if (write(ans_out, buf, ANSWER) != ANSWER) {
			perror("write");
			exit(1);
		}
	}
	return unused;
}

static void *bulk_sender(void *unused)
{
	char *p = malloc(bulk_write);
	memset(p, 1, bulk_write);
	while (write(bulk_tx, p, bulk_write) > 0)
		;
	return unused;
}

static void *bulk_receiver(void *unused)
{
	char *p = malloc(1 << 16);
	while (read(bulk_rx, p, 1 << 16) > 0)
		;
	return unused;
}

static int cmp(const void *x, const void *y)
{
	long d = *(const long *)x - *(const long *)y;
	return d < 0 ? -1 : d > 0;
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: %s tcp|unix [BULK_WRITE_BYTES [SPIN_US]]\n", argv[0]);
		return 2;
	}
	int unix_ = !strcmp(argv[1], "unix");
	bulk_write = argc > 2 ? atol(argv[2]) : 0;
	long spin_ns = argc > 3 ? atol(argv[3]) * 1000 : 0;
	pthread_t t;
	if (bulk_write > 0) {
		pair(0, &bulk_tx, &bulk_rx);
		pthread_create(&t, NULL, bulk_sender, NULL);
		pthread_create(&t, NULL, bulk_receiver, NULL);
		usleep(100000);
	}
	int req_out, ans_in;
	pair(unix_, &req_out, &req_in);
	pair(unix_, &ans_out, &ans_in);
	pthread_create(&t, NULL, source, NULL);
	long *lat = malloc(ROUNDS * sizeof *lat);
	char req[24] = { 1 }, ans[ANSWER];
	for (int i = 0; i < ROUNDS; i++) {
		long t0 = now_ns();
		if (write(req_out, req, sizeof req) != sizeof req) {
			perror("write");
			return 1;
		}
		int got = 0;
		while (spin_ns && got < ANSWER && now_ns() - t0 < spin_ns) {
			int r = recv(ans_in, ans + got, ANSWER - got, MSG_DONTWAIT);
			if (r > 0)
				got += r;
		}
		read_all(ans_in, ans + got, ANSWER - got);
		lat[i] = now_ns() - t0;
		usleep(50);
	}
	qsort(lat, ROUNDS, sizeof *lat, cmp);
	printf("%s, bulk %ld B writes, spin %ld us: p50 %.1f us, p90 %.1f, p99 %.1f, max %.1f\n", argv[1], bulk_write,
	       spin_ns / 1000, lat[ROUNDS / 2] / 1e3, lat[ROUNDS * 9 / 10] / 1e3, lat[ROUNDS * 99 / 100] / 1e3,
	       lat[ROUNDS - 1] / 1e3);
	return 0;
}
