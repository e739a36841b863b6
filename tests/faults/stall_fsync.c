/* A disk that stops answering, for tests/durability.rs, loaded into
 * `fleetgate serve` with LD_PRELOAD.
 *
 * While the file named by STALL_FSYNC_WHILE exists, every fsync() and
 * fdatasync() of a file under the directory STALL_FSYNC_UNDER waits until
 * it is removed; the first such wait creates STALL_FSYNC_WHILE.stalled, so
 * the test knows the stall happened. Other files are untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int under_prefix(int fd) {
    const char *under = getenv("STALL_FSYNC_UNDER");
    if (!under) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strncmp(path, under, strlen(under)) == 0;
}

static void stall(int fd) {
    const char *flag = getenv("STALL_FSYNC_WHILE");
    if (!flag || !under_prefix(fd) || access(flag, F_OK) != 0) return;
    char stalled[PATH_MAX];
    snprintf(stalled, sizeof stalled, "%s.stalled", flag);
    int marker = open(stalled, O_CREAT | O_WRONLY, 0600);
    if (marker >= 0) close(marker);
    while (access(flag, F_OK) == 0) usleep(10000);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    stall(fd);
    return real(fd);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    stall(fd);
    return real(fd);
}
