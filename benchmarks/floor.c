/*
 * floor: the least work a throwaway container needs, as a yardstick for the box lifecycle.
 *
 *     floor [LOWER [PROGRAM]]        LOWER defaults to "/", PROGRAM to "/bin/true"
 *
 * The parent forks a child into new mount, PID, network, UTS and IPC namespaces. The child,
 * PID 1 of its namespace, mounts a tmpfs for the overlay's upper and work directories, an
 * overlay with LOWER as its only lower layer, pivots into it, mounts a fresh proc and execs
 * PROGRAM. The parent waits for it and exits with its status. Cleanup is the kernel's: when
 * PID 1 exits, its namespaces go, and every mount made in them with them; nothing is left on
 * the host, so there is nothing more to undo.
 *
 * Why clone(2) rather than fork(2) + unshare(2): unshare(CLONE_NEWPID) does not move the
 * caller into the new PID namespace, only its next child, so fork + unshare would need a
 * second fork before PID 1 exists. clone with the same flags is that fork and unshare in one
 * system call: the cheapest correct way, which is what a floor must be.
 *
 * Left out on purpose (a box does them; the floor does not): /dev, masking /proc files,
 * cgroups, dropping capabilities, an init that serves commands, networking beyond the empty
 * namespace. The gap between this and a box is what those cost, plus each tool's own overhead.
 *
 * Build: cc -O2 -o floor floor.c. Run as root.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

/* Where the scratch tmpfs goes in the child's copy of the host's mounts: every host has /proc,
 * it is never part of a lower layer (proc is a mount of its own), and the child mounts a fresh
 * proc inside the new root afterwards. pytest-nsbox uses the same spot for the same reason. */
#define SCRATCH "/proc"
#define NAMESPACES (CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC)

static void die(const char *what) {
    fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
    _exit(125);
}

static void make_dir(const char *path) {
    if (mkdir(path, 0755) < 0 && errno != EEXIST) die(path);
}

/* PID 1 of the new namespaces: build the root, enter it, exec the program. Never returns. */
static void child(const char *lower, const char *program) {
    char options[4096];
    /* Mount events must not leak back to the host, whatever its propagation settings. */
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) die("make / private");
    if (mount("tmpfs", SCRATCH, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0) die("mount scratch tmpfs");
    make_dir(SCRATCH "/upper");
    make_dir(SCRATCH "/work");
    make_dir(SCRATCH "/root");
    int written = snprintf(options, sizeof options, "lowerdir=%s,upperdir=%s,workdir=%s", lower,
                           SCRATCH "/upper", SCRATCH "/work");
    if (written < 0 || (size_t)written >= sizeof options) {
        errno = ENAMETOOLONG;
        die("overlay options");
    }
    if (mount("overlay", SCRATCH "/root", "overlay", 0, options) < 0) die("mount overlay");
    if (chdir(SCRATCH "/root") < 0) die("chdir to the new root");
    /* pivot_root(".", "."): the old root ends up stacked under the new one, and is then
     * detached from "." (as runc does), so no directory for it is needed in the new root. */
    if (syscall(SYS_pivot_root, ".", ".") < 0) die("pivot_root");
    if (umount2(".", MNT_DETACH) < 0) die("detach the old root");
    if (chdir("/") < 0) die("chdir /");
    make_dir("/proc");
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0) die("mount proc");
    if (sethostname("floor", 5) < 0) die("sethostname");
    char *const argv[] = {(char *)program, NULL};
    execv(program, argv);
    die(program);
}

int main(int argc, char **argv) {
    const char *lower = argc > 1 ? argv[1] : "/";
    const char *program = argc > 2 ? argv[2] : "/bin/true";
    /* A raw clone without a new stack behaves as fork(): the child returns here with 0. */
    pid_t pid = (pid_t)syscall(SYS_clone, NAMESPACES | SIGCHLD, NULL, NULL, NULL, NULL);
    if (pid < 0) die("clone into new namespaces");
    if (pid == 0) child(lower, program);
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) die("waitpid");
    }
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    return 128 + WTERMSIG(status);
}
