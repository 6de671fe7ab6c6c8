/*
 * How much CPU the destination needs to place 1 GiB of postcopy pages, by placement method,
 * without the network: each run of 16 pages is first copied from a source buffer (standing in
 * for the copy out of the socket), then made visible in a userfaultfd-registered mapping.
 *
 *   copy      anonymous RAM (livemig's today): memcpy into a staging buffer, UFFDIO_COPY the run
 *   ioctl     as copy without the memcpy: UFFDIO_COPY alone, from a staging buffer already warm
 *   minor     memfd-backed RAM, a second (unregistered) mapping of it written directly, then
 *             UFFDIO_CONTINUE maps the run into the registered view (minor faults, no 2nd copy);
 *             the written pages are allocated by the writes
 *   prefill   as minor, with the memfd populated beforehand (MADV_POPULATE_WRITE, timed apart)
 *   move      anonymous RAM: memcpy into a freshly populated staging run, UFFDIO_MOVE it in
 *
 * Build and run (root or vm.unprivileged_userfaultfd=1; kernel >= 6.8 for move):
 *   cc -O2 -o /tmp/uffd_place scripts/models/uffd_place.c
 *   for m in copy ioctl minor prefill move; do /tmp/uffd_place $m; done
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_MOVE
#define UFFD_FEATURE_MOVE (1 << 16)
struct uffdio_move {
	unsigned long long dst, src, len, mode;
	long long move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, 0x05, struct uffdio_move)
#endif

#define RAM (1UL << 30)
#define RUN (16 * 4096UL)
#define SRC (16UL << 20)

static double cpu_s(void)
{
	struct rusage r;
	getrusage(RUSAGE_SELF, &r);
	return r.ru_utime.tv_sec + r.ru_utime.tv_usec * 1e-6 + r.ru_stime.tv_sec + r.ru_stime.tv_usec * 1e-6;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

int main(int argc, char **argv)
{
	const char *m = argc > 1 ? argv[1] : "copy";
	int ioctl_only = !strcmp(m, "ioctl");
	int copy = !strcmp(m, "copy") || ioctl_only, minor = !strcmp(m, "minor"), prefill = !strcmp(m, "prefill"),
	    move = !strcmp(m, "move");
	if (!(copy || minor || prefill || move)) {
		fprintf(stderr, "usage: %s copy|ioctl|minor|prefill|move\n", argv[0]);
		return 2;
	}
	int shmem = minor || prefill;
	int uffd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (uffd < 0)
		die("userfaultfd");
	struct uffdio_api api = { .api = UFFD_API,
				  .features = shmem ? UFFD_FEATURE_MINOR_SHMEM : move ? UFFD_FEATURE_MOVE : 0 };
	if (ioctl(uffd, UFFDIO_API, &api))
		die("UFFDIO_API");
	char *src = malloc(SRC);
	memset(src, 7, SRC);
	char *guest, *alias = NULL;
	if (shmem) {
		int fd = memfd_create("ram", MFD_CLOEXEC);
		if (fd < 0 || ftruncate(fd, RAM))
			die("memfd");
		guest = mmap(NULL, RAM, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		alias = mmap(NULL, RAM, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		madvise(alias, RAM, MADV_NOHUGEPAGE);
	} else {
		guest = mmap(NULL, RAM, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	}
	madvise(guest, RAM, MADV_NOHUGEPAGE);
	char *stage = mmap(NULL, RUN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	struct uffdio_register reg = { .range = { (unsigned long)guest, RAM },
				       .mode = UFFDIO_REGISTER_MODE_MISSING | (shmem ? UFFDIO_REGISTER_MODE_MINOR : 0) };
	if (ioctl(uffd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
	double c0 = cpu_s();
	if (prefill && madvise(alias, RAM, MADV_POPULATE_WRITE))
		die("MADV_POPULATE_WRITE");
	double c1 = cpu_s();
	for (size_t o = 0; o < RAM; o += RUN) {
		char *from = src + (o % SRC);
		if (copy) {
			if (!ioctl_only)
				memcpy(stage, from, RUN);
			else if (o == 0)
				memset(stage, 7, RUN);
			struct uffdio_copy c = { .dst = (unsigned long)guest + o, .src = (unsigned long)stage, .len = RUN };
			if (ioctl(uffd, UFFDIO_COPY, &c))
				die("UFFDIO_COPY");
		} else if (move) {
			if (madvise(stage, RUN, MADV_POPULATE_WRITE))
				die("MADV_POPULATE_WRITE");
			memcpy(stage, from, RUN);
			struct uffdio_move mv = { .dst = (unsigned long)guest + o, .src = (unsigned long)stage, .len = RUN };
			if (ioctl(uffd, UFFDIO_MOVE, &mv))
				die("UFFDIO_MOVE");
		} else {
			memcpy(alias + o, from, RUN);
			struct uffdio_continue c = { .range = { (unsigned long)guest + o, RUN } };
			if (ioctl(uffd, UFFDIO_CONTINUE, &c))
				die("UFFDIO_CONTINUE");
		}
	}
	double c2 = cpu_s();
	if (guest[RAM - 1] != 7)
		die("the last page did not arrive");
	printf("%-8s placing 1 GiB: %4.0f ms CPU; beforehand: %4.0f ms CPU\n", m, (c2 - c1) * 1e3, (c1 - c0) * 1e3);
	return 0;
}
