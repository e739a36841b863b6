/* A faulty disk under one directory, for tests/durability.rs, loaded into
 * `fleetgate serve` with LD_PRELOAD. While the file named by
 * FSYNC_FAULT_WHILE exists, syncs of files under the directory
 * FSYNC_FAULT_UNDER misbehave as FSYNC_FAULT says:
 *
 *   fail   every fdatasync() fails with EIO, and the bytes written to the
 *          file since its last successful fsync or fdatasync are gone, as
 *          the kernel may drop pages whose writeback failed. fsync() is
 *          untouched, so a new WAL segment still starts with a durable
 *          header.
 *   stall  every fsync() and fdatasync() waits until the flag file is
 *          removed; the first such wait creates FSYNC_FAULT_WHILE.stalled,
 *          so the test knows the stall happened.
 *
 * Other files are untouched. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define FILES 8192

/* The size of each file under the prefix (by device and inode) at its last
 * successful sync; open addressing, one lock. */
static struct {
    int used;
    dev_t dev;
    ino_t ino;
    off_t size;
} synced[FILES];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static int under_prefix(int fd) {
    const char *under = getenv("FSYNC_FAULT_UNDER");
    if (!under) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strncmp(path, under, strlen(under)) == 0;
}

/* Whether `mode` is the fault, the flag file exists and fd is under the prefix. */
static int faulty(const char *mode, int fd) {
    const char *fault = getenv("FSYNC_FAULT");
    const char *flag = getenv("FSYNC_FAULT_WHILE");
    return fault && strcmp(fault, mode) == 0 && flag && access(flag, F_OK) == 0 &&
           under_prefix(fd);
}

/* The slot of a file: its own, or the free one where it goes. */
static unsigned slot(const struct stat *st) {
    unsigned i = (unsigned)((st->st_ino * 31u + st->st_dev) % FILES);
    for (unsigned probes = 0; probes < FILES; probes++, i = (i + 1) % FILES) {
        if (!synced[i].used || (synced[i].dev == st->st_dev && synced[i].ino == st->st_ino)) {
            return i;
        }
    }
    fprintf(stderr, "fsync fault: more than %d files\n", FILES);
    abort();
}

static void remember(int fd) {
    struct stat st;
    if (!under_prefix(fd) || fstat(fd, &st) != 0) return;
    pthread_mutex_lock(&lock);
    unsigned i = slot(&st);
    synced[i].used = 1;
    synced[i].dev = st.st_dev;
    synced[i].ino = st.st_ino;
    synced[i].size = st.st_size;
    pthread_mutex_unlock(&lock);
}

static void lose_unsynced(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return;
    pthread_mutex_lock(&lock);
    unsigned i = slot(&st);
    off_t keep = synced[i].used ? synced[i].size : 0;
    pthread_mutex_unlock(&lock);
    if (keep < st.st_size && ftruncate(fd, keep) != 0) perror("fsync fault: ftruncate");
}

static void stall_while_flagged(int fd) {
    if (!faulty("stall", fd)) return;
    const char *flag = getenv("FSYNC_FAULT_WHILE");
    char stalled[PATH_MAX];
    snprintf(stalled, sizeof stalled, "%s.stalled", flag);
    int marker = open(stalled, O_CREAT | O_WRONLY, 0600);
    if (marker >= 0) close(marker);
    while (access(flag, F_OK) == 0) usleep(10000);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (faulty("fail", fd)) {
        lose_unsynced(fd);
        errno = EIO;
        return -1;
    }
    stall_while_flagged(fd);
    int rc = real(fd);
    if (rc == 0) remember(fd);
    return rc;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    stall_while_flagged(fd);
    int rc = real(fd);
    if (rc == 0) remember(fd);
    return rc;
}
