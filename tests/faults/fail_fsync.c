/* A disk whose writeback keeps failing, for tests/durability.rs, loaded
 * into `fleetgate serve` with LD_PRELOAD.
 *
 * While the file named by FAIL_FSYNC_WHILE exists, every fdatasync() of a
 * file under the directory FAIL_FSYNC_UNDER fails with EIO, and the bytes
 * written to that file since its last successful fsync or fdatasync are
 * gone, as the kernel may drop pages whose writeback failed. fsync() and
 * other files are untouched, so a new WAL segment still starts with a
 * durable header. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
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
    const char *under = getenv("FAIL_FSYNC_UNDER");
    if (!under) return 0;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return strncmp(path, under, strlen(under)) == 0;
}

static int failing(void) {
    const char *flag = getenv("FAIL_FSYNC_WHILE");
    return flag && access(flag, F_OK) == 0;
}

/* The slot of a file: its own, or the free one where it goes. */
static unsigned slot(const struct stat *st) {
    unsigned i = (unsigned)((st->st_ino * 31u + st->st_dev) % FILES);
    for (unsigned probes = 0; probes < FILES; probes++, i = (i + 1) % FILES) {
        if (!synced[i].used || (synced[i].dev == st->st_dev && synced[i].ino == st->st_ino)) {
            return i;
        }
    }
    fprintf(stderr, "fail_fsync: more than %d files\n", FILES);
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
    if (keep < st.st_size && ftruncate(fd, keep) != 0) perror("fail_fsync: ftruncate");
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    if (failing() && under_prefix(fd)) {
        lose_unsynced(fd);
        errno = EIO;
        return -1;
    }
    int rc = real(fd);
    if (rc == 0) remember(fd);
    return rc;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    if (rc == 0) remember(fd);
    return rc;
}
