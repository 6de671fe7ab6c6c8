#!/bin/sh
# netbed.sh — a shaped network link between two network namespaces, for migrations across a
# link slower than loopback. Needs root (ip netns, tc).
#
#   scripts/netbed.sh up [RATE] [tbf|htb]   create the bed; RATE as tc takes it (1gbit, 500mbit;
#                                           "none": unshaped), qdisc tbf (default) or htb
#   scripts/netbed.sh down                  remove it (also safe when it is not there)
#   scripts/netbed.sh status                show the namespaces, addresses and qdiscs
#   scripts/netbed.sh exec src|dst CMD...   run CMD inside one end
#
# Layout: namespace $NETBED_PREFIX-src holds veth $NETBED_PREFIX-s (10.231.0.1/24),
# namespace $NETBED_PREFIX-dst holds veth $NETBED_PREFIX-d (10.231.0.2/24); loopback is up in
# both. The shaper sits on the egress of both veth ends, so each direction is held to RATE
# (the migration stream goes src -> dst, the return path back). This kernel has no netem, so
# the bed adds no latency (veth round trip: tens of microseconds).
#
# Unix sockets on the filesystem are not tied to a network namespace: processes started
# inside the bed are still reached from outside through their QMP sockets.
set -eu

PREFIX=${NETBED_PREFIX:-lmbed}
NS_SRC=$PREFIX-src
NS_DST=$PREFIX-dst
IF_SRC=$PREFIX-s
IF_DST=$PREFIX-d
ADDR_SRC=10.231.0.1
ADDR_DST=10.231.0.2

die() { echo "netbed: $*" >&2; exit 1; }

# Bytes the token bucket may hold: at least 1 ms at RATE (tbf needs burst >= rate / HZ) and
# at least 64 KiB (one GSO super-packet on a veth).
burst_for() {
    bits=$(rate_bits "$1")
    b=$((bits / 8 / 1000))
    [ "$b" -lt 65536 ] && b=65536
    echo "$b"
}

# tc's rate syntax to bits per second (kbit, mbit, gbit; bit; plain numbers are bits).
rate_bits() {
    r=$(echo "$1" | tr 'A-Z' 'a-z')
    case "$r" in
        *gbit) echo $(( ${r%gbit} * 1000000000 )) ;;
        *mbit) echo $(( ${r%mbit} * 1000000 )) ;;
        *kbit) echo $(( ${r%kbit} * 1000 )) ;;
        *bit) echo "${r%bit}" ;;
        *[!0-9]*) die "rate '$1': use NNNkbit, NNNmbit or NNNgbit" ;;
        *) echo "$r" ;;
    esac
}

shape() { # ns dev rate qdisc
    ns=$1 dev=$2 rate=$3 qdisc=$4
    [ "$rate" = none ] && return 0
    burst=$(burst_for "$rate")
    case "$qdisc" in
        tbf)
            ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 50ms
            ;;
        htb)
            ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: htb default 10
            # One class, so its quantum (default rate / r2q, too big for tc above ~160
            # Mbit/s) only needs to be at least one packet.
            ip netns exec "$ns" tc class add dev "$dev" parent 1: classid 1:10 htb rate "$rate" ceil "$rate" burst "$burst" cburst "$burst" quantum 65536
            ;;
        *) die "qdisc '$qdisc': tbf or htb" ;;
    esac
}

down() {
    ip netns del "$NS_SRC" 2>/dev/null || true
    ip netns del "$NS_DST" 2>/dev/null || true
    # A veth end left in the root namespace by an interrupted `up`.
    ip link del "$IF_SRC" 2>/dev/null || true
}

up() {
    rate=${1:-1gbit}
    qdisc=${2:-tbf}
    [ "$(id -u)" = 0 ] || die "needs root (ip netns, tc)"
    [ "$rate" = none ] || rate_bits "$rate" >/dev/null
    down
    ip netns add "$NS_SRC"
    ip netns add "$NS_DST"
    ip link add "$IF_SRC" type veth peer name "$IF_DST"
    ip link set "$IF_SRC" netns "$NS_SRC"
    ip link set "$IF_DST" netns "$NS_DST"
    ip -n "$NS_SRC" addr add "$ADDR_SRC/24" dev "$IF_SRC"
    ip -n "$NS_DST" addr add "$ADDR_DST/24" dev "$IF_DST"
    for ns in "$NS_SRC" "$NS_DST"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_SRC" link set "$IF_SRC" up
    ip -n "$NS_DST" link set "$IF_DST" up
    shape "$NS_SRC" "$IF_SRC" "$rate" "$qdisc"
    shape "$NS_DST" "$IF_DST" "$rate" "$qdisc"
    # The link is usable once both ends report carrier.
    i=0
    until [ "$(ip netns exec "$NS_SRC" cat /sys/class/net/"$IF_SRC"/operstate)" = up ] &&
        [ "$(ip netns exec "$NS_DST" cat /sys/class/net/"$IF_DST"/operstate)" = up ]; do
        i=$((i + 1))
        [ "$i" -lt 50 ] || die "the veth pair does not come up"
        sleep 0.1
    done
    echo "netbed: $NS_SRC ($ADDR_SRC) <-> $NS_DST ($ADDR_DST), $rate ${qdisc}"
}

status() {
    for ns in "$NS_SRC" "$NS_DST"; do
        echo "== $ns"
        ip -n "$ns" -brief addr 2>/dev/null || { echo "(absent)"; continue; }
        ip netns exec "$ns" tc -s qdisc show 2>/dev/null | grep -v '^ *$' || true
    done
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    up) up "$@" ;;
    down) down ;;
    status) status ;;
    exec)
        side=${1:-}
        [ $# -gt 0 ] && shift
        case "$side" in
            src) exec ip netns exec "$NS_SRC" "$@" ;;
            dst) exec ip netns exec "$NS_DST" "$@" ;;
            *) die "exec src|dst CMD..." ;;
        esac
        ;;
    *) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
