#!/bin/sh
# Installer of "greet" 1.2.0, the kind that is piped into sh: `curl -fsSL .../install.sh | sh`.
#
# Installs the program to /usr/local/bin, its default configuration to /etc/greet/greet.conf
# (never overwriting one the administrator already has: the new default goes beside it as
# greet.conf.new), and its state directory /var/lib/greet. It unpacks in a temporary directory
# and removes it, so it leaves nothing else behind. Running it again changes nothing.
set -eu

PREFIX=${PREFIX:-/usr/local}
work=$(mktemp -d /tmp/greet-install.XXXXXX)
trap 'rm -rf "$work"' EXIT

cat > "$work/greet" <<'PROGRAM'
#!/bin/sh
. /etc/greet/greet.conf
echo "$greeting, ${1:-world}"
PROGRAM
printf 'greeting=Hello\n' > "$work/greet.conf"

install -D -m 755 "$work/greet" "$PREFIX/bin/greet"
if [ ! -e /etc/greet/greet.conf ]; then
    install -D -m 644 "$work/greet.conf" /etc/greet/greet.conf
elif ! cmp -s "$work/greet.conf" /etc/greet/greet.conf; then
    install -m 644 "$work/greet.conf" /etc/greet/greet.conf.new
    echo "kept your /etc/greet/greet.conf; the new default is /etc/greet/greet.conf.new"
fi
install -d -m 750 /var/lib/greet
echo "greet 1.2.0 installed in $PREFIX/bin"
