#!/bin/bash
# Usage: tests/vm/run-tests-in-guest.sh [PYTEST ARGS...]     (default: tests/integration -q)
#
# Runs this checkout's tests as root inside a pure cgroup v2 Linux, whatever the host has (cgroup
# v1 hosts included): Debian's user-mode-linux package is a Linux 6.1 kernel that runs as an
# ordinary process, booted with cgroup_no_v1=all. The guest is Debian bookworm; the checkout is
# shared read-only and copied into the guest, which runs `python3 -m pytest -p no:cacheprovider
# ARGS` there and powers off. Exits with the guest pytest's status; 124 if the guest ran out of
# time, 125 if it never reported one (did not boot, crashed, or could not set up).
# The guest's tests see NSBOX_IN_UML_GUEST=1.
#
# Needs root (apt-get, mmdebstrap, mkfs) and, the first time, network access to the Debian mirror
# and PyPI. See tests/vm/README.md. Environment:
#   NSBOX_VM_DIR      cache: root image and Python dependencies (/var/tmp/pytest-nsbox-vm)
#   NSBOX_VM_TIMEOUT  seconds before the guest is killed (900)
#   NSBOX_VM_MEM      guest memory in MiB (2048)
#   NSBOX_VM_CGROUP   the guest cgroup pytest runs in (/system.slice/pytest-nsbox.service; / = root)
#   NSBOX_VM_CGROUPNS 1: pytest gets a cgroup namespace rooted there, as in a Docker container
#   NSBOX_VM_ROOTLESS 1: pytest runs as an ordinary user (uid 1000, a /etc/subuid range) whose
#                     cgroup subtree is delegated to it, as systemd's user@.service has
#   NSBOX_VM_TMP      what the guest's /tmp is: disk (ext4, the default) or tmpfs
#   NSBOX_VM_REBUILD  1: rebuild the image and the dependencies even if they are current
#   NSBOX_VM_PYTHON   host Python whose pip fetches the dependencies (python3)
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CHECKOUT=$(cd "$HERE/../.." && pwd)
VM_DIR=${NSBOX_VM_DIR:-/var/tmp/pytest-nsbox-vm}
VM_TIMEOUT=${NSBOX_VM_TIMEOUT:-900}
VM_MEM=${NSBOX_VM_MEM:-2048}
VM_CGROUP=${NSBOX_VM_CGROUP:-/system.slice/pytest-nsbox.service}
VM_CGROUPNS=${NSBOX_VM_CGROUPNS:-0}
VM_ROOTLESS=${NSBOX_VM_ROOTLESS:-0}
VM_TMP=${NSBOX_VM_TMP:-disk}
PYTHON=${NSBOX_VM_PYTHON:-python3}
PYTEST_ARGS=("$@")
((${#PYTEST_ARGS[@]})) || PYTEST_ARGS=(tests/integration -q)

# --- The recipe. Any change to these values rebuilds the cached image or dependencies. ---------
SUITE=bookworm # its python3 is CPython 3.11 on glibc 2.36: the wheels below must fit that
GUEST_PACKAGES=(
	python3
	mount util-linux procps iproute2 kmod # mount/umount, ipcmk/ipcs, ps, ip, modprobe
	coreutils mawk grep sed tar hostname libc-bin # stat/dd/df, awk, getent/ldd
	nftables # nat=True loads its rules with nft (this kernel's nf_tables lacks the ip family: those skip)
	e2fsprogs # disks= makes its ext4 filesystems with mkfs.ext4
	uidmap # rootless boxes map a /etc/subuid range with newuidmap/newgidmap
)
# pip (before 24) takes each --platform literally: list every manylinux tag glibc 2.36 satisfies.
GUEST_PYTHON_TAGS=(--python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none)
for tag in manylinux_2_{36..5} manylinux2014 manylinux2010 manylinux1; do
	GUEST_PYTHON_TAGS+=(--platform "${tag}_$(uname -m)")
done
PIP_PACKAGES=(pytest pluggy pyroute2 psutil filelock zstandard)
# PID 1 as baked into the image: it only mounts the run's share and hands over to the guest-init
# that comes with it, so the image does not change when the harness does.
BOOT_STUB='#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
work=$(sed -n "s/.*nsbox\.work=\([^ ]*\).*/\1/p" /proc/cmdline)
mkdir -p /out && mount -t hostfs hostfs /out -o "$work/out" && exec /bin/bash /out/guest-init
echo "nsbox-vm-boot: cannot mount the share $work/out" >&2
echo o > /proc/sysrq-trigger'
RECIPE_VERSION=2 # bump to force a rebuild everywhere
IMAGE_STAMP=$(printf '%s\n' "$RECIPE_VERSION" "$SUITE" "${GUEST_PACKAGES[@]}" "$BOOT_STUB" | sha256sum | cut -c1-16)
SITE_STAMP=$(printf '%s\n' "$RECIPE_VERSION" "${GUEST_PYTHON_TAGS[@]}" "${PIP_PACKAGES[@]}" | sha256sum | cut -c1-16)
# -------------------------------------------------------------------------------------------------

log() { echo "run-tests-in-guest: $*" >&2; }
die() {
	log "$1"
	exit "${2:-125}"
}

WORK= BUILD= UML_PID= UML_PGID= WATCHDOG_PID=
cleanup() {
	set +e # best effort, every step: a failed kill or wait must not skip the rest
	# Only processes this script started, by PID: the UML kernel's process group (setsid made the
	# kernel its leader; its helpers and the host processes behind guest processes are members),
	# then the watchdog, which ends within a second of the kernel. SIGKILL at once, all together:
	# everything of the guest is throwaway, and no member is left to outlive the others.
	if [ -n "$UML_PID" ]; then
		kill -KILL -- "-$UML_PID" 2>/dev/null
		wait "$UML_PID" 2>/dev/null
		UML_PID=
	fi
	if [ -n "$UML_PGID" ] && command -v pgrep >/dev/null; then
		# Killed guest processes take a moment to go (the kernel that traced them is gone first).
		for _ in $(seq 100); do
			pgrep -g "$UML_PGID" >/dev/null || break
			sleep 0.1
		done
	fi
	if [ -n "$WATCHDOG_PID" ]; then wait "$WATCHDOG_PID" 2>/dev/null; fi
	if [ -n "$WORK" ]; then rm -rf "$WORK"; fi
	if [ -n "$BUILD" ] && [ -d "$BUILD" ]; then
		# An interrupted mmdebstrap may leave its chroot mounts: never delete through them.
		awk -v under="$BUILD/" 'index($5, under) == 1 {print $5}' /proc/self/mountinfo |
			sort -r | xargs -r -n1 umount -l
		rm -rf --one-file-system "$BUILD"
	fi
	return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || die "run me as root: the guest image is built with mmdebstrap and mkfs"
[[ $VM_TIMEOUT =~ ^[0-9]+$ && $VM_MEM =~ ^[0-9]+$ ]] || die "NSBOX_VM_TIMEOUT and NSBOX_VM_MEM take whole numbers"

install_host_packages() {
	if command -v linux.uml >/dev/null && command -v mmdebstrap >/dev/null && command -v mkfs.ext4 >/dev/null &&
		[ -d /usr/lib/uml/modules ]; then
		return
	fi
	log "installing user-mode-linux mmdebstrap e2fsprogs"
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q user-mode-linux mmdebstrap e2fsprogs
}

build_image() {
	if [ "${NSBOX_VM_REBUILD:-0}" != 1 ] && [ -f "$VM_DIR/rootfs.img" ] &&
		[ "$(cat "$VM_DIR/rootfs.img.stamp" 2>/dev/null)" = "$IMAGE_STAMP" ]; then
		return
	fi
	log "building the guest image ($SUITE, mmdebstrap; a few minutes, once) in $VM_DIR"
	BUILD=$(mktemp -d "$VM_DIR/build.XXXXXX")
	local packages
	packages=$(
		IFS=,
		echo "${GUEST_PACKAGES[*]}"
	)
	mmdebstrap --variant=minbase --include="$packages" --quiet "$SUITE" "$BUILD/rootfs"
	printf '%s\n' "$BOOT_STUB" >"$BUILD/rootfs/sbin/nsbox-vm-boot"
	chmod 755 "$BUILD/rootfs/sbin/nsbox-vm-boot"
	mkdir -p "$BUILD/rootfs/lib/modules" # the host's /usr/lib/uml/modules is mounted here
	rm -rf "$BUILD/rootfs/var/cache/apt/"* "$BUILD/rootfs/var/lib/apt/lists/"*
	# The guest's /tmp lives here too (layer caches, pytest's tmp_path): 8 GiB to spare. Sparse,
	# and the guest's writes go to a per-run copy-on-write file, so the space costs nothing.
	local size=$(($(du -sm "$BUILD/rootfs" | cut -f1) + 8192))
	mkfs.ext4 -q -F -L nsbox-vm -d "$BUILD/rootfs" "$BUILD/rootfs.img" "${size}M"
	mv -f "$BUILD/rootfs.img" "$VM_DIR/rootfs.img"
	echo "$IMAGE_STAMP" >"$VM_DIR/rootfs.img.stamp"
	rm -rf --one-file-system "$BUILD"
	BUILD=
}

build_site() {
	if [ "${NSBOX_VM_REBUILD:-0}" != 1 ] && [ -d "$VM_DIR/site" ] &&
		[ "$(cat "$VM_DIR/site.stamp" 2>/dev/null)" = "$SITE_STAMP" ]; then
		return
	fi
	log "fetching the guest's Python dependencies: ${PIP_PACKAGES[*]}"
	"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip (set NSBOX_VM_PYTHON)"
	BUILD=$(mktemp -d "$VM_DIR/build.XXXXXX")
	# Wheels for the guest's Python, not the host's: the host may run another version.
	"$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location --root-user-action=ignore \
		--only-binary=:all: "${GUEST_PYTHON_TAGS[@]}" --target "$BUILD/site" "${PIP_PACKAGES[@]}"
	rm -rf "$VM_DIR/site"
	mv "$BUILD/site" "$VM_DIR/site"
	echo "$SITE_STAMP" >"$VM_DIR/site.stamp"
	rm -rf --one-file-system "$BUILD"
	BUILD=
}

install_host_packages
mkdir -p "$VM_DIR"
# One builder at a time; a run that waits here then finds the cache current.
exec {lock}>"$VM_DIR/lock"
flock "$lock"
build_image
build_site
exec {lock}>&-

# The kernel command line cannot carry spaces or commas, and hostfs takes one path per mount: the
# run directory gets plain names, symlinks to wherever the checkout and cache really are.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/pytest-nsbox-vm.XXXXXX")
[[ $WORK != *[[:space:],]* ]] || die "the temporary directory $WORK has a space or comma in its path: set TMPDIR"
ln -s "$CHECKOUT" "$WORK/src"
ln -s "$VM_DIR/site" "$WORK/site"
mkdir "$WORK/out" "$WORK/uml"
cp "$HERE/guest-init" "$WORK/out/guest-init"
{
	printf 'WORK=%q\nCGROUP=%q\nCGROUPNS=%q\nTMP_FS=%q\nROOTLESS=%q\n' \
		"$WORK" "$VM_CGROUP" "$VM_CGROUPNS" "$VM_TMP" "$VM_ROOTLESS"
	printf 'PYTEST_ARGS=('
	printf '%q ' "${PYTEST_ARGS[@]}"
	printf ')\n'
} >"$WORK/out/settings"

# ubd0: a throwaway copy-on-write file over the shared, never-written image. umid/uml_dir keep
# UML's control socket and pid file in the run directory; TMPDIR is where UML backs guest memory
# (an unlinked file; tmpfs is fastest). quiet + loglevel=3 keep kernel chatter off the output.
started=$SECONDS
TMPDIR=/dev/shm setsid linux.uml \
	ubd0="$WORK/cow,$VM_DIR/rootfs.img" root=/dev/ubda rw init=/sbin/nsbox-vm-boot \
	mem="${VM_MEM}M" con=null ssl=null con0=null,fd:1 \
	umid="nsbox-$$" uml_dir="$WORK/uml" \
	cgroup_no_v1=all panic=-1 quiet loglevel=3 \
	nsbox.work="$WORK" </dev/null &
UML_PID=$! UML_PGID=$!
# Not `timeout linux.uml`: that would signal only the kernel process, and its helpers could
# outlive it. The watchdog kills the whole process group instead.
(
	deadline=$((SECONDS + VM_TIMEOUT))
	while kill -0 "$UML_PID" 2>/dev/null; do
		if ((SECONDS >= deadline)); then
			touch "$WORK/timed-out"
			kill -KILL -- "-$UML_PID" 2>/dev/null
			exit 0
		fi
		sleep 1
	done
) &
WATCHDOG_PID=$!
wait "$UML_PID" 2>/dev/null || true # (no "Killed" job notice: the timeout is reported below)
UML_PID=
elapsed=$((SECONDS - started))

if [ -e "$WORK/timed-out" ]; then
	die "the guest ran for more than $VM_TIMEOUT s (NSBOX_VM_TIMEOUT) and was killed" 124
fi
if [ ! -s "$WORK/out/rc" ]; then
	die "the guest reported no pytest exit status after ${elapsed} s: it did not boot, crashed, or could not set up (see its console output above)"
fi
rc=$(cat "$WORK/out/rc")
log "guest pytest exit status $rc (guest ran ${elapsed} s)"
exit "$rc"
