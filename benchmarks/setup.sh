#!/bin/sh
# Installs the benchmark's peers and tools from Debian's packages (as root). None of them is a
# dependency of pytest-nsbox: they are only contenders (bubblewrap, crun, runc, podman), the
# workload (sysbench), the compiler for floor.c (gcc) and the Debian image builder (mmdebstrap).
# Idempotent: packages already installed are left alone, and apt is not touched at all when
# nothing is missing.
set -eu

PACKAGES="bubblewrap crun runc podman sysbench gcc mmdebstrap"

missing=""
for package in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $package"
    fi
done

if [ -z "$missing" ]; then
    echo "setup.sh: all of $PACKAGES already installed"
    exit 0
fi

echo "setup.sh: installing$missing"
apt-get update
# shellcheck disable=SC2086  # one word per package, on purpose
DEBIAN_FRONTEND=noninteractive apt-get install -y $missing
