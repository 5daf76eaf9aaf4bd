#!/bin/sh
# Creates (or extends) the password-based identities of an edgewatch deployment, with nothing
# secret in git:
#
#   configs/security/make-identities.sh DIR NAME...
#
#   DIR/passwords.env   NAME's password as EDGEWATCH_PW_<NAME> (upper case, '-' as '_'), mode 600:
#                       the nats-server environment (users.conf.example reads it), and where each
#                       process's password_env comes from
#   DIR/passwords       the mosquitto password file (mosquitto_passwd -b), mode 600; written when
#                       mosquitto_passwd is installed (Debian: apt-get install mosquitto)
#
# NAME is an agent id (its user name on the broker), aggregator-N, sensors, ops, ...: it must match
# [A-Za-z0-9_-]{1,64}. Names already in passwords.env keep their password; new ones get a random
# one (32 hex digits behind "pw", so that nats-server reads it as a string). Run it again with more
# names to add identities. mosquitto rereads its password file on SIGHUP; nats-server its
# environment only on restart.
set -eu

if [ $# -lt 2 ]; then
    echo "usage: $0 DIR NAME..." >&2
    exit 1
fi
dir=$1
shift
mkdir -p "$dir"
env_file="$dir/passwords.env"
umask 077
touch "$env_file"

var_of() {
    printf 'EDGEWATCH_PW_%s' "$(printf '%s' "$1" | tr 'a-z-' 'A-Z_')"
}

for name in "$@"; do
    if ! printf '%s' "$name" | grep -Eq '^[A-Za-z0-9_-]{1,64}$'; then
        echo "$0: identity '$name' must match [A-Za-z0-9_-]{1,64}" >&2
        exit 1
    fi
    var=$(var_of "$name")
    if grep -q "^$var=" "$env_file"; then
        owner=$(sed -n "s/^# identity \(.*\) is $var\$/\1/p" "$env_file")
        if [ -n "$owner" ] && [ "$owner" != "$name" ]; then
            echo "$0: '$name' and '$owner' both map to $var: rename one" >&2
            exit 1
        fi
        continue
    fi
    password="pw$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    printf '# identity %s is %s\n%s=%s\n' "$name" "$var" "$var" "$password" >>"$env_file"
done

if command -v mosquitto_passwd >/dev/null 2>&1; then
    rm -f "$dir/passwords"
    : >"$dir/passwords"
    sed -n 's/^# identity \(.*\) is \(.*\)$/\1 \2/p' "$env_file" | while read -r name var; do
        password=$(sed -n "s/^$var=//p" "$env_file")
        mosquitto_passwd -b "$dir/passwords" "$name" "$password"
    done
    echo "wrote $env_file and $dir/passwords"
else
    echo "wrote $env_file (mosquitto_passwd not installed: no mosquitto password file)"
fi
