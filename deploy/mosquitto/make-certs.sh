#!/bin/sh
# A small CA for a devicerunner fleet, with openssl (EC P-256, SHA-256).
#
#   make-certs.sh ca DIR                    DIR/ca.key, DIR/ca.crt (the CA; keep ca.key offline)
#   make-certs.sh broker DIR NAME [NAME..]  DIR/broker.key, DIR/broker.crt for the host names
#                                           or IP addresses devices and operators connect to
#   make-certs.sh device DIR ID             DIR/devices/ID.key, DIR/devices/ID.crt, CN = ID
#
# The device listener takes the certificate CN as the device's user name,
# so the CN must be a valid device id ([A-Za-z0-9_.-], 1 to 64 characters).
# Operators do not get certificates: they log in with a password on the
# operators' listener (mosquitto_passwd), which device certificates never reach.
# DAYS (default 825) sets the validity of broker and device certificates;
# the CA is valid for 3650 days. Existing files are never overwritten.
set -eu

usage() {
    sed -n '3,7p' "$0" >&2
    exit 2
}

die() {
    echo "make-certs.sh: $*" >&2
    exit 1
}

DAYS=${DAYS:-825}

newkey() {
    [ ! -e "$1" ] || die "$1 exists; refusing to overwrite it"
    (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null) ||
        die "openssl could not create $1"
}

# sign KEY CRT CN EXTENSIONS: a certificate for KEY, issued by DIR/ca.
sign() {
    [ -f "$dir/ca.key" ] && [ -f "$dir/ca.crt" ] || die "no CA in $dir (run: make-certs.sh ca $dir)"
    [ ! -e "$2" ] || die "$2 exists; refusing to overwrite it"
    ext=$(mktemp)
    printf '%s\n' "$4" >"$ext"
    openssl req -new -key "$1" -subj "/CN=$3" |
        openssl x509 -req -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
            -days "$DAYS" -sha256 -extfile "$ext" -out "$2" 2>/dev/null ||
        { rm -f "$ext"; die "openssl could not sign $2"; }
    rm -f "$ext"
    echo "$2: CN=$3, valid $DAYS days"
}

[ $# -ge 2 ] || usage
cmd=$1
dir=$2
shift 2
mkdir -p "$dir"

case "$cmd" in
ca)
    [ $# -eq 0 ] || usage
    newkey "$dir/ca.key"
    openssl req -x509 -new -key "$dir/ca.key" -subj "/CN=devicerunner fleet CA" -days 3650 -sha256 \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$dir/ca.crt" 2>/dev/null || die "openssl could not create $dir/ca.crt"
    echo "$dir/ca.crt: the fleet CA (give it to devices and operators; keep $dir/ca.key offline)"
    ;;
broker)
    [ $# -ge 1 ] || usage
    san=""
    for name in "$@"; do
        case "$name" in
        *[!0-9.]*) entry="DNS:$name" ;;
        *) entry="IP:$name" ;;
        esac
        san="${san:+$san,}$entry"
    done
    newkey "$dir/broker.key"
    sign "$dir/broker.key" "$dir/broker.crt" "$1" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san"
    ;;
device)
    [ $# -eq 1 ] || usage
    id=$1
    printf '%s' "$id" | grep -Eqx '[A-Za-z0-9_.-]{1,64}' ||
        die "device id '$id': use [A-Za-z0-9_.-], 1 to 64 characters"
    mkdir -p "$dir/devices"
    newkey "$dir/devices/$id.key"
    sign "$dir/devices/$id.key" "$dir/devices/$id.crt" "$id" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
    ;;
*)
    usage
    ;;
esac
