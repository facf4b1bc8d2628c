#!/usr/bin/env bash
# flctl's multi-host test lab on one machine (needs root).
#
#   scripts/lab.sh up N [DIR] [--force]   N hosts lab1..labN (+ the stranger labx);
#                                         with DIR, also a ready flctl workspace there
#   scripts/lab.sh down                   remove everything the lab made (idempotent)
#   scripts/lab.sh status [--json]        hosts, addresses, sshd state, fingerprints
#   scripts/lab.sh stop-host NAME         host "goes down": sshd stopped, link down
#   scripts/lab.sh start-host NAME        and comes back
#   scripts/lab.sh exec NAME CMD...       run CMD with the view an SSH session on NAME gets
#                                         (its namespaces, cwd /root, sshd's root environment)
#
# Each host is a network namespace flctl-labI (198.18.0.(10+I)/24 on eth0, a veth
# into the bridge flctl-br0 = 198.18.0.1, the hub, in the root namespace) plus a
# mount+UTS namespace owned by a "holder" process (sleep) that keeps the host's
# private mounts alive: tmpfs /run and /dev/shm, a private /tmp, and overlays over
# /etc, /opt, /var/lib, /root and /home whose upper layers live in the lab folder
# (so whatever a host writes there, /opt/flctl, /etc/wireguard, a pip cache, stays
# in the lab). Its /etc carries its own hostname, hosts and a fail-fast resolv.conf.
# sshd (key-only, own host key) runs inside the holder's namespaces, so stopping
# and restarting it keeps the host's files and processes; `exec` enters the same
# namespaces.
#
# Everything lives in ${FLCTL_LAB_DIR:-/tmp/flctl-lab}; nothing is written to the
# real /etc, /opt, /var/lib or /run, and the root namespace's nftables ruleset is
# never touched. Addresses come only from 198.18.0.0/15.
#
# Environment: FLCTL_LAB_DIR (lab folder), FLCTL_PYTHON (python with flctl
# installed; default this checkout's .venv/bin/python, which scripts/test.sh
# and scripts/demo.sh make, else python3), FLCTL_LAB_OWNER (pid recorded as the lab's owner,
# used by tests/lab.py to recognise a lab left behind by a dead test run).
# Exit codes: 0 ok, 1 failure, 2 usage, 3 a lab is already up.
set -euo pipefail
umask 022

LAB_DIR=${FLCTL_LAB_DIR:-/tmp/flctl-lab}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${FLCTL_PYTHON:-} ]]; then PYTHON=$FLCTL_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python
else PYTHON=python3; fi
BRIDGE=flctl-br0
BRIDGE_MAC=02:f1:c7:00:00:01   # locally administered
HUB_IP=198.18.0.1
SUBNET_PREFIX=198.18.0
STRANGER=labx
STRANGER_IP=198.18.0.250
MAX_HOSTS=64
OVERLAY_SUBNET=198.19.0.0/24
DATA_PATH=/var/lib/flctl-data/data.npz
SSHD=/usr/sbin/sshd
OVERLAY_DIRS=(/etc /opt /var/lib /root /home)  # copy-on-write per host; missing ones skipped
MARKER=.flctl-lab           # only a folder holding this file is ever removed by `down`
READY_TIMEOUT=15            # seconds to wait for a holder or an sshd (up: + 1 per 2 hosts)
LINK_TIMEOUT=5              # seconds to wait for a link to carry traffic (up: + 1 per 8 hosts)

die() { echo "lab: $*" >&2; exit 1; }
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
help() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; }
now() { echo "$EPOCHREALTIME"; }
# Waits poll. `sleep` is a process, and 49 hosts polling every 10 ms would
# start thousands a second on a machine busy starting their sshds; `read -t`
# on a pipe nobody writes to (opened by lock_lab) waits as long without one.
nap() {
    if [[ -n ${NAP_FD:-} ]]; then read -r -t "$1" -u "$NAP_FD" _ 2>/dev/null || true
    else sleep "$1"; fi
}
usec() { echo "${EPOCHREALTIME//[.,]/}"; }  # microseconds, for short deadlines

# ------------------------------------------------------------------ names and checks

netns_of() { echo "flctl-$1"; }
veth_of() { echo "flctl-v$1"; }
host_dir() { echo "$LAB_DIR/hosts/$1"; }

address_of() {
    if [[ $1 == "$STRANGER" ]]; then echo "$STRANGER_IP"; else echo "$SUBNET_PREFIX.$((10 + ${1#lab}))"; fi
}

lab_hosts() {  # the ssh hosts of the current lab, one per line
    [[ -r $LAB_DIR/hosts.list ]] && cat "$LAB_DIR/hosts.list"
    return 0
}

known_node() {  # NAME is a host of this lab or the stranger
    local name=$1
    [[ $name == "$STRANGER" ]] && return 0
    grep -qx -- "$name" "$LAB_DIR/hosts.list" 2>/dev/null
}

check_lab_dir() {
    [[ $LAB_DIR == /* ]] || die "FLCTL_LAB_DIR must be an absolute path (got '$LAB_DIR')"
    LAB_DIR=$(realpath -m -- "$LAB_DIR")
    case "$LAB_DIR/" in
        /|/opt/*|/var/lib/*|/run/*|/var/run/*|/etc/*|/proc/*|/sys/*|/dev/*|/usr/*|/tmp/|/root/*|/home/*)
            die "FLCTL_LAB_DIR=$LAB_DIR: pick a folder of its own outside /etc, /opt, /var/lib, /root, /home, /run, /usr (default /tmp/flctl-lab)" ;;
    esac
}

# True while PID is a live (not zombie) process. Killed processes can stay
# zombies for a while (PID 1 reaps late), and `kill -0` succeeds on zombies.
alive() {
    local line state
    [[ $1 =~ ^[0-9]+$ ]] || return 1
    { read -r line < "/proc/$1/stat"; } 2>/dev/null || return 1
    state=${line##*) }
    state=${state%% *}
    [[ $state != Z && $state != X ]]
}

# PID from PIDFILE if it is alive, its command is COMM and it lives in the
# network namespace NETNS (the PID namespace is shared: a recycled PID must
# never be mistaken for ours).
owned_pid() {
    local pidfile=$1 comm=$2 netns=$3 pid actual
    { read -r pid < "$pidfile"; } 2>/dev/null || return 1
    alive "$pid" || return 1
    { read -r actual < "/proc/$pid/comm"; } 2>/dev/null || return 1
    [[ $actual == "$comm" ]] || return 1
    [[ /proc/$pid/ns/net -ef /run/netns/$netns ]] || return 1
    echo "$pid"
}

holder_pid() { owned_pid "$(host_dir "$1")/state/holder.pid" sleep "$(netns_of "$1")"; }
sshd_pid() { owned_pid "$(host_dir "$1")/state/sshd.pid" sshd "$(netns_of "$1")"; }

# True when something listens on TCP port 22 in the network namespace of PID.
listening_22() {
    local sl local_addr rem st rest
    {
        while read -r sl local_addr rem st rest; do
            [[ $local_addr == *:0016 && $st == 0A ]] && return 0
        done < "/proc/$1/net/tcp"
    } 2>/dev/null
    return 1
}

link_up() {  # root-side veth of NAME is administratively up
    local line flags
    line=$(ip -o link show dev "$(veth_of "$1")" 2>/dev/null) || return 1
    flags=${line#*<}
    flags=${flags%%>*}
    [[ ,$flags, == *,UP,* ]]
}

# Both ends of NAME's link carry traffic: the kernel applies carrier changes
# late (linkwatch runs at most once a second), and until then the bridge port
# does not forward and the host's eth0 drops what it sends: a connection
# attempted in that window fails with "No route to host".
link_ready() {
    local name=$1 holder=$2 veth state
    veth=/sys/class/net/$(veth_of "$name")
    { read -r state < "$veth/operstate"; } 2>/dev/null && [[ $state == up ]] || return 1
    { read -r state < "$veth/brport/state"; } 2>/dev/null && [[ $state == 3 ]] || return 1
    { read -r state < "/proc/$holder/root/sys/class/net/eth0/operstate"; } 2>/dev/null &&
        [[ $state == up ]]
}

wait_link_ready() {  # NAME
    local name=$1 holder deadline
    holder=$(holder_pid "$name") || die "$name: its namespace holder is gone"
    deadline=$(( EPOCHSECONDS + LINK_TIMEOUT ))
    until link_ready "$name" "$holder"; do
        (( EPOCHSECONDS < deadline )) || die "$name: its link did not come up"
        nap 0.02
    done
}

lab_exists() {
    [[ -e $LAB_DIR ]] && return 0
    ip link show dev "$BRIDGE" >/dev/null 2>&1 && return 0
    lab_netns | grep -q .
}

lab_netns() {  # every lab namespace that exists, whatever the lab folder says
    ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^flctl-lab([0-9]+|x)$' || true
}

# ------------------------------------------------------------------ host set-up

# Runs inside the host's network namespace, in fresh mount and UTS namespaces,
# as the holder process: configures the network, mounts the private
# directories, reports its pid and then sleeps forever holding them.
# shellcheck disable=SC2016
HOLDER_SCRIPT='
set -eu
name=$1 addr=$2 hd=$3
shift 3
echo "$name" > /proc/sys/kernel/hostname
echo 1 > /proc/sys/net/ipv6/conf/eth0/disable_ipv6
echo 2 > /proc/sys/net/ipv4/neigh/eth0/mcast_solicit
echo 500 > /proc/sys/net/ipv4/neigh/eth0/retrans_time_ms
ip -batch - <<EOF
link set lo up
addr add $addr/24 dev eth0
link set eth0 up
EOF
# -n everywhere: util-linux would otherwise make /run/mount on the real /run.
umount -n -l /run/netns 2>/dev/null || true
mount -n -t tmpfs -o mode=0755,nosuid,nodev,size=64m flctl-run /run
mkdir -m 0755 /run/sshd /run/flctl-lab
mkdir -m 1777 /run/lock
mount -n --bind "$hd/state" /run/flctl-lab
for spec in "$@"; do  # /var/lib:var_lib
    dir=${spec%%:*} key=${spec#*:}
    mount -n -t overlay "flctl-$key" -o "lowerdir=$dir,upperdir=$hd/ov/$key/upper,workdir=$hd/ov/$key/work" "$dir"
done
mount -n -t tmpfs -o mode=1777,nosuid,nodev,size=64m flctl-shm /dev/shm
mount -n --bind "$hd/tmp" /tmp
cd /root 2>/dev/null || cd /     # where `exec` starts, like an SSH session
echo $$ > /run/flctl-lab/holder.pid.new
mv /run/flctl-lab/holder.pid.new /run/flctl-lab/holder.pid
exec sleep infinity
'

overlay_key() { local key=${1#/}; echo "${key//\//_}"; }  # /var/lib -> var_lib

# Written into the upper layer of the host's /etc before it is mounted.
write_host_files() {  # NAME ADDRESS (all hosts' names are in HOST_NAMES)
    local name=$1 addr=$2 hd etc other
    hd=$(host_dir "$name")
    etc=$hd/ov/etc/upper
    echo "$name" > "$etc/hostname"
    {
        printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
        printf '%s\t%s\n' "$addr" "$name"
        printf '%s\tflctl-hub\n' "$HUB_IP"
        for other in "${HOST_NAMES[@]}"; do
            [[ $other == "$name" ]] || printf '%s\t%s\n' "$(address_of "$other")" "$other"
        done
    } > "$etc/hosts"
    # No DNS in the lab: fail at once instead of hanging getfqdn() for seconds.
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > "$etc/resolv.conf"
    if [[ $FIX_SHADOW == 1 ]]; then  # sshd without PAM refuses a locked ("!") root
        sed 's/^root:![^:]*:/root:*:/' /etc/shadow > "$etc/shadow"
        chmod --reference=/etc/shadow "$etc/shadow"
        chown --reference=/etc/shadow "$etc/shadow"
    fi
    # root's shell start-up files of a fresh Debian host (from /etc/skel), over
    # the machine's own: those may run slow or locking set-up (pyenv rehash
    # waits up to 60 s on a lock shared with the machine) in every SSH command.
    if [[ -d $hd/ov/root/upper ]]; then
        for other in .bashrc .profile; do
            if [[ -f /etc/skel/$other ]]; then cp /etc/skel/$other "$hd/ov/root/upper/$other"
            else : > "$hd/ov/root/upper/$other"; fi
        done
    fi
    [[ $name == "$STRANGER" ]] && return 0
    cat > "$hd/state/sshd_config" <<EOF
# sshd of lab host $name (paths as seen inside the host)
ListenAddress $addr:22
HostKey /run/flctl-lab/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile /run/flctl-lab/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
X11Forwarding no
PrintMotd no
PrintLastLog no
MaxStartups 64:30:128
MaxSessions 64
LoginGraceTime 30
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
EOF
    cp "$LAB_DIR/id_ed25519.pub" "$hd/state/authorized_keys"
}

start_holder() {  # NAME -> holder pid once its mounts are in place
    local name=$1 hd pid deadline
    hd=$(host_dir "$name")
    # A background job of a shell without job control is no process group
    # leader, so setsid does not fork: $! is the holder itself.
    setsid ip netns exec "$(netns_of "$name")" \
        unshare --mount --uts --propagation private \
        sh -c "$HOLDER_SCRIPT" holder "$name" "$(address_of "$name")" "$hd" "${OVERLAY_SPECS[@]}" \
        </dev/null >>"$hd/holder.log" 2>&1 9<&- {NAP_FD}<&- &
    pid=$!
    deadline=$(( ${EPOCHSECONDS} + READY_TIMEOUT ))
    # Ready once it has written its pid AND exec'd sleep: holder_pid checks the
    # command, and on a loaded machine the exec can lag the pid file.
    until [[ -s $hd/state/holder.pid ]] && holder_pid "$name" >/dev/null; do
        alive "$pid" || { cat "$hd/holder.log" >&2; die "$name: namespace set-up failed"; }
        (( EPOCHSECONDS < deadline )) || die "$name: namespace set-up timed out"
        nap 0.01
    done
    [[ $(<"$hd/state/holder.pid") == "$pid" ]] || die "$name: holder pid mismatch"
    echo "$pid"
}

start_sshd() {  # NAME: start sshd inside the host's namespaces and wait until it listens
    local name=$1 hd holder pid deadline
    hd=$(host_dir "$name")
    holder=$(holder_pid "$name") || die "$name: its namespace holder is gone; run down and up again"
    setsid nsenter -t "$holder" -n -m -u -- "$SSHD" -D -e -f /run/flctl-lab/sshd_config \
        </dev/null >>"$hd/sshd.log" 2>&1 9<&- {NAP_FD}<&- &
    pid=$!
    echo "$pid" > "$hd/state/sshd.pid"
    deadline=$(( ${EPOCHSECONDS} + READY_TIMEOUT ))
    until listening_22 "$holder"; do
        alive "$pid" || { tail -n 20 "$hd/sshd.log" >&2; die "$name: sshd exited"; }
        (( EPOCHSECONDS < deadline )) || die "$name: sshd did not listen within ${READY_TIMEOUT}s"
        nap 0.01
    done
    sshd_pid "$name" >/dev/null || die "$name: the process listening is not our sshd"
}

setup_node() {  # NAME: one host (or the stranger) in its own background job
    local name=$1 pid
    pid=$(start_holder "$name")
    # Recorded so `down` also ends processes that left the network namespace.
    readlink "/proc/$pid/ns/mnt" > "$(host_dir "$name")/state/mntns"
    [[ $name == "$STRANGER" ]] || start_sshd "$name"
    wait_link_ready "$name"
}

make_keys() {  # client key pair, and each host's key with its fingerprint
    local name hd kind key pids=()
    ssh-keygen -q -t ed25519 -N '' -C flctl-lab-operator -f "$LAB_DIR/id_ed25519" &
    pids+=($!)
    for name in "${HOST_NAMES[@]}"; do
        hd=$(host_dir "$name")
        { ssh-keygen -q -t ed25519 -N '' -C "root@$name" -f "$hd/state/ssh_host_ed25519_key" &&
          ssh-keygen -l -f "$hd/state/ssh_host_ed25519_key.pub" | awk '{print $2}' > "$hd/state/fingerprint"; } &
        pids+=($!)
    done
    wait_all "key generation" "${pids[@]}"
    for name in "${HOST_NAMES[@]}"; do
        read -r kind key _ < "$(host_dir "$name")/state/ssh_host_ed25519_key.pub"
        echo "$(address_of "$name") $kind $key"
    done > "$LAB_DIR/known_hosts"
}

wait_all() {  # WHAT PID...: wait for background jobs, fail if any failed
    local what=$1 pid failed=0
    shift
    for pid in "$@"; do wait "$pid" || failed=1; done
    (( failed == 0 )) || die "$what failed"
}

# Non-IID shards of the bundled digits, written into each host's /var/lib
# upper layer before the overlay is mounted.
write_shards() {
    (cd / && exec "$PYTHON" - "$LAB_DIR" "$DATA_PATH" "${HOST_NAMES[@]}") <<'EOF'
import sys
from pathlib import Path

from flctl.core.data import make_federated_shards, save_dataset

lab, data_path, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
relative = Path(data_path).relative_to("/var/lib")
shards, _ = make_federated_shards(len(names), alpha=0.5, seed=0)
for name, shard in zip(names, shards):
    target = lab / "hosts" / name / "ov" / "var_lib" / "upper" / relative
    target.parent.mkdir(exist_ok=True)  # not parents: never re-create a removed lab
    save_dataset(shard, target)
EOF
}

# DIR becomes a flctl workspace for the lab: init (the function behind
# `flctl init DIR --force`, called directly so the lab does not depend on the
# CLI's imports), lab overlay subnet, an inventory of the lab hosts, checked
# by the real loader.
make_workspace() {
    local dir=$1
    (cd / && exec "$PYTHON" - "$dir" "$LAB_DIR" "$OVERLAY_SUBNET" "$DATA_PATH" "${HOST_NAMES[@]}") <<'EOF'
import dataclasses
import ipaddress
import sys
from pathlib import Path

from flctl.core.data import load_digits
from flctl.core.fsutil import atomic_write
from flctl.core.settings import load_settings, render_settings
from flctl.workspace import init_workspace, load_workspace

root, lab, subnet, data_path, names = (Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3],
                                       sys.argv[4], sys.argv[5:])
init_workspace(root, force=True)  # what `flctl init DIR --force` does
settings_file = root / "flctl.yaml"
settings = load_settings(settings_file)
overlay = dataclasses.replace(settings.overlay, subnet=ipaddress.IPv4Network(subnet))
# the model's shape is the operator's to set: the lab's shards are the digits
x, y = load_digits()
settings = settings.with_training(task_params={"n_features": int(x.shape[1]),
                                               "n_classes": int(y.max()) + 1})
atomic_write(settings_file, render_settings(dataclasses.replace(settings, overlay=overlay)))

lines = [
    "# Lab hosts made by scripts/lab.sh: network namespaces on this machine.",
    "# Host keys are in known_hosts next to this file; `scripts/lab.sh down` removes the lab.",
    "all:",
    "  children:",
    "    lab:",
    "      vars:",
    "        connection: ssh",
    "        ssh_user: root",
    f"        ssh_key: {lab / 'id_ed25519'}",
    f"        data_path: {data_path}",
    "      hosts:",
]
for name in names:
    lines.append(f"        {name}:")
    lines.append(f"          ssh_host: 198.18.0.{10 + int(name[3:])}")
atomic_write(root / "inventory.yaml", "\n".join(lines) + "\n")

workspace = load_workspace(root)
found = [h.name for h in workspace.inventory.hosts]
if found != names:
    sys.exit(f"inventory check failed: expected hosts {names}, loaded {found}")
EOF
}

# ------------------------------------------------------------------ commands

up_failed() {  # EXIT trap of `up`: stop the set-up jobs, then remove what was made
    local status=$1 job
    trap - EXIT INT TERM HUP
    (( status != 0 )) || exit 0
    echo "lab: up failed, cleaning up" >&2
    for job in $(jobs -p); do kill "$job" 2>/dev/null || true; done
    cmd_down >/dev/null 2>&1 || true
    exit "$status"
}

cmd_up() {
    local count="" dir="" force=0 arg
    for arg in "$@"; do
        case "$arg" in
            --force) force=1 ;;
            -*) usage ;;
            *) if [[ -z $count ]]; then count=$arg; elif [[ -z $dir ]]; then dir=$arg; else usage; fi ;;
        esac
    done
    [[ $count =~ ^[0-9]+$ ]] && (( count >= 1 && count <= MAX_HOSTS )) ||
        die "up: the number of hosts must be 1..$MAX_HOSTS (got '${count}')"
    [[ $(id -u) == 0 ]] || die "the lab needs root (network namespaces, mounts, sshd)"
    # every host starts at once on however few cores there are
    READY_TIMEOUT=$(( READY_TIMEOUT + count / 2 )) LINK_TIMEOUT=$(( LINK_TIMEOUT + count / 8 ))
    [[ -x $SSHD ]] || die "$SSHD not found: install openssh-server"
    (cd / && "$PYTHON" -c 'import flctl') 2>/dev/null ||
        die "$PYTHON cannot import flctl: run scripts/test.sh (it makes .venv) or set FLCTL_PYTHON to a python with flctl installed"
    check_lab_dir
    if [[ -n $dir ]]; then
        dir=$(realpath -m -- "$dir")
        [[ $dir/ == "$LAB_DIR"/* ]] && die "the workspace must not be inside the lab folder"
    fi
    if lab_exists; then
        if (( force )); then cmd_down; else
            echo "lab: a lab is already up (folder $LAB_DIR, bridge $BRIDGE or flctl-lab* namespaces):" \
                 "run 'scripts/lab.sh down' first, or 'up --force'" >&2
            exit 3
        fi
    fi
    local started
    started=$(now)
    mkdir -m 0700 "$LAB_DIR" 2>/dev/null || { echo "lab: $LAB_DIR appeared meanwhile (another lab?)" >&2; exit 3; }
    # From here on, a failure removes whatever was made.
    touch "$LAB_DIR/$MARKER"
    trap 'up_failed $?' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM HUP
    # The bridge is the machine-wide claim: only one lab at a time.
    # A fixed MAC: a bridge otherwise takes its ports' lowest MAC, which changes
    # as hosts go down and up, and the hosts' ARP entries for the hub go stale.
    ip link add "$BRIDGE" address "$BRIDGE_MAC" type bridge 2>/dev/null || {
        trap - EXIT; rm -rf -- "$LAB_DIR"; echo "lab: $BRIDGE exists (another lab?)" >&2; exit 3; }
    echo "${FLCTL_LAB_OWNER:-}" > "$LAB_DIR/owner"
    echo "$dir" > "$LAB_DIR/workspace"

    HOST_NAMES=()
    local i name
    for (( i = 1; i <= count; i++ )); do HOST_NAMES+=("lab$i"); done
    printf '%s\n' "${HOST_NAMES[@]}" > "$LAB_DIR/hosts.list"
    local nodes=("${HOST_NAMES[@]}" "$STRANGER") dirs=() path hd
    OVERLAY_SPECS=()
    for path in "${OVERLAY_DIRS[@]}"; do
        if [[ -d $path && ! -L $path ]]; then OVERLAY_SPECS+=("$path:$(overlay_key "$path")"); fi
    done
    local spec uppers tmps=()
    for name in "${nodes[@]}"; do
        hd=$(host_dir "$name")
        dirs+=("$hd/state" "$hd/tmp")
        tmps+=("$hd/tmp")
        for spec in "${OVERLAY_SPECS[@]}"; do dirs+=("$hd/ov/${spec#*:}/upper" "$hd/ov/${spec#*:}/work"); done
    done
    mkdir -p "${dirs[@]}"
    chmod 1777 "${tmps[@]}"
    for spec in "${OVERLAY_SPECS[@]}"; do  # an overlay's root takes its upper dir's owner and mode
        uppers=("$LAB_DIR"/hosts/*/ov/"${spec#*:}"/upper)
        chown --reference="${spec%%:*}" "${uppers[@]}"
        chmod --reference="${spec%%:*}" "${uppers[@]}"
    done
    FIX_SHADOW=0
    if [[ $(awk -F: '$1 == "root" {print substr($2, 1, 1)}' /etc/shadow 2>/dev/null) == "!" ]]; then FIX_SHADOW=1; fi

    # Slow, independent pieces run in the background while the network is made.
    write_shards > "$LAB_DIR/shards.log" 2>&1 &
    local shards_job=$! workspace_job=""
    if [[ -n $dir ]]; then
        make_workspace "$dir" > "$LAB_DIR/workspace.log" 2>&1 &
        workspace_job=$!
    fi

    # iproute2 makes /run/netns (a directory, bind-mounted on itself) on first
    # use; note whether we did, so that `down` can undo it.
    [[ -d /run/netns ]] || touch "$LAB_DIR/made-run-netns-dir"
    awk '$5 == "/run/netns" {found = 1} END {exit !found}' /proc/self/mountinfo ||
        touch "$LAB_DIR/made-run-netns-mount"
    # Network: namespaces serially (parallel `ip netns add` races), one ip process.
    {
        for name in "${nodes[@]}"; do echo "netns add $(netns_of "$name")"; done
        for name in "${nodes[@]}"; do
            echo "link add $(veth_of "$name") type veth peer name eth0 netns $(netns_of "$name")"
        done
    } | ip -batch - || die "creating namespaces and links failed"
    for name in "$BRIDGE" "${nodes[@]/#/flctl-v}"; do  # no IPv6 link-local chatter on the lab links
        echo 1 > "/proc/sys/net/ipv6/conf/$name/disable_ipv6" 2>/dev/null || true
    done
    # A stopped host's address fails to resolve in ~1 s (2 ARP probes, 0.5 s
    # apart) rather than 3 s; these are the bridge's own settings.
    echo 2 > "/proc/sys/net/ipv4/neigh/$BRIDGE/mcast_solicit"
    echo 500 > "/proc/sys/net/ipv4/neigh/$BRIDGE/retrans_time_ms"
    {
        echo "addr add $HUB_IP/24 dev $BRIDGE"
        echo "link set $BRIDGE up"
        for name in "${nodes[@]}"; do echo "link set $(veth_of "$name") master $BRIDGE up"; done
    } | ip -batch - || die "configuring the bridge failed"

    make_keys
    for name in "${nodes[@]}"; do write_host_files "$name" "$(address_of "$name")"; done
    wait "$shards_job" || { cat "$LAB_DIR/shards.log" >&2; die "writing the data shards failed (FLCTL_PYTHON=$PYTHON)"; }

    local jobs=()
    for name in "${nodes[@]}"; do setup_node "$name" & jobs+=($!); done
    wait_all "host set-up" "${jobs[@]}"
    if [[ -n $workspace_job ]]; then
        wait "$workspace_job" || { cat "$LAB_DIR/workspace.log" >&2; die "making the workspace $dir failed"; }
        cp "$LAB_DIR/known_hosts" "$dir/known_hosts"
    fi
    trap - EXIT INT TERM HUP

    local elapsed
    elapsed=$(awk -v a="$started" -v b="$(now)" 'BEGIN {printf "%.2f", b - a}')
    echo "lab up: $count hosts in ${elapsed} s (folder $LAB_DIR, hub $HUB_IP on $BRIDGE)"
    for name in "${HOST_NAMES[@]}"; do
        printf '  %-6s %-14s %s\n' "$name" "$(address_of "$name")" "$(<"$(host_dir "$name")/state/fingerprint")"
    done
    printf '  %-6s %-14s %s\n' "$STRANGER" "$STRANGER_IP" "stranger: no sshd, in no inventory"
    echo "ssh: ssh -i $LAB_DIR/id_ed25519 -o UserKnownHostsFile=$LAB_DIR/known_hosts root@$(address_of lab1)"
    [[ -z $dir ]] || echo "workspace: $dir (inventory.yaml, known_hosts, pki/; overlay $OVERLAY_SUBNET)"
}

# Processes to end: every process in a lab network namespace or in a lab
# host's mount namespace (recorded at up), found in one pass over /proc.
lab_pids() {
    local -A wanted=()
    local ns id path link pid
    for ns in $(lab_netns); do
        id=$(stat -L -c %i "/run/netns/$ns" 2>/dev/null) && wanted["net:[$id]"]=1
    done
    for path in "$LAB_DIR"/hosts/*/state/mntns; do
        [[ -r $path ]] && wanted["$(<"$path")"]=1
    done
    (( ${#wanted[@]} )) || return 0
    find /proc -mindepth 3 -maxdepth 3 -path '/proc/[0-9]*/ns/*' \( -name net -o -name mnt \) \
        -printf '%p %l\n' 2>/dev/null |
    while read -r path link; do
        [[ -n $link && -n ${wanted[$link]:-} ]] || continue
        pid=${path#/proc/}
        pid=${pid%%/*}
        [[ $pid != "$$" && $pid != "$BASHPID" ]] && echo "$pid"
    done | sort -un
}

end_lab_processes() {
    local pids deadline signal
    for signal in TERM KILL; do
        pids=$(lab_pids)
        [[ -z $pids ]] && return 0
        # shellcheck disable=SC2086
        kill -s "$signal" $pids 2>/dev/null || true
        deadline=$(( $(usec) + 1500000 ))
        while (( $(usec) < deadline )); do
            pids=$(lab_pids)
            [[ -z $pids ]] && return 0
            nap 0.05
        done
    done
    echo "lab: processes still alive after SIGKILL: $(lab_pids | tr '\n' ' ')" >&2
    return 1
}

cmd_down() {
    check_lab_dir
    local failed=0 name
    if [[ -d $LAB_DIR && ! -e $LAB_DIR/$MARKER ]]; then
        die "$LAB_DIR is not a lab folder (no $MARKER): not touching it"
    fi
    end_lab_processes || failed=1
    {
        ip -o link show 2>/dev/null | awk -F': ' '{sub(/@.*/, "", $2); print $2}' |
            grep -E '^flctl-(br0|vlab([0-9]+|x))$' | sed 's/^/link del /'
        lab_netns | sed 's/^/netns del /'
    } | ip -force -batch - >/dev/null 2>&1 || true
    # Undo iproute2's /run/netns if the lab made it and no namespace uses it
    # (not lazily: a namespace added meanwhile by anyone keeps it busy).
    if [[ -z $(ip netns list 2>/dev/null) ]]; then
        [[ -e $LAB_DIR/made-run-netns-mount ]] && { umount -n /run/netns 2>/dev/null || true; }
        [[ -e $LAB_DIR/made-run-netns-dir ]] && { rmdir /run/netns 2>/dev/null || true; }
    fi
    # Lab mounts live in the hosts' own mount namespaces and die with them;
    # anything under the lab folder in this namespace would be a leak: detach it.
    local mounts
    mounts=$(awk -v dir="$LAB_DIR" 'index($2, dir) == 1 {print $2}' /proc/mounts | sort -r)
    for name in $mounts; do umount -n -l "$name" 2>/dev/null || failed=1; done
    if [[ -d $LAB_DIR ]]; then rm -rf -- "$LAB_DIR" || failed=1; fi
    if ip link show dev "$BRIDGE" >/dev/null 2>&1 || lab_netns | grep -q .; then
        echo "lab: links or namespaces remain after down" >&2
        failed=1
    fi
    (( failed == 0 )) || die "down did not finish cleanly"
    echo "lab down"
}

json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

cmd_status() {
    local json=0
    case "${1:-}" in --json) json=1 ;; "") ;; *) usage ;; esac
    check_lab_dir
    if [[ ! -r $LAB_DIR/hosts.list ]]; then
        if (( json )); then printf '{"up": false, "dir": %s}\n' "$(json_str "$LAB_DIR")"; else echo "no lab at $LAB_DIR"; fi
        exit 1
    fi
    local name hd addr fp spid hpid sshd_ok link_ok up workspace first=1
    workspace=$(<"$LAB_DIR/workspace")
    if (( json )); then
        printf '{"up": true, "dir": %s, "hub": "%s", "bridge": "%s", ' "$(json_str "$LAB_DIR")" "$HUB_IP" "$BRIDGE"
        printf '"key": %s, "known_hosts": %s, ' "$(json_str "$LAB_DIR/id_ed25519")" "$(json_str "$LAB_DIR/known_hosts")"
        if [[ -n $workspace ]]; then printf '"workspace": %s, ' "$(json_str "$workspace")"; else printf '"workspace": null, '; fi
        printf '"hosts": ['
    else
        echo "lab at $LAB_DIR (hub $HUB_IP on $BRIDGE)"
    fi
    for name in $(lab_hosts) "$STRANGER"; do
        hd=$(host_dir "$name")
        addr=$(address_of "$name")
        hpid=$(holder_pid "$name") || hpid=""
        spid=""; sshd_ok=false; link_ok=false; up=false; fp=""
        [[ $name == "$STRANGER" ]] || fp=$(<"$hd/state/fingerprint")
        if [[ $name != "$STRANGER" ]] && spid=$(sshd_pid "$name") && [[ -n $hpid ]] && listening_22 "$hpid"; then sshd_ok=true; fi
        link_up "$name" && link_ok=true
        if [[ -n $hpid && $link_ok == true ]] && { [[ $name == "$STRANGER" ]] || [[ $sshd_ok == true ]]; }; then up=true; fi
        if (( json )); then
            (( first )) || printf ', '
            first=0
            printf '{"name": "%s", "address": "%s", "netns": "%s", "up": %s, "sshd": %s, "link": %s, ' \
                "$name" "$addr" "$(netns_of "$name")" "$up" "$sshd_ok" "$link_ok"
            printf '"holder_pid": %s, "sshd_pid": %s, ' "${hpid:-null}" "${spid:-null}"
            if [[ $name == "$STRANGER" ]]; then printf '"stranger": true, "fingerprint": null}'
            else printf '"stranger": false, "fingerprint": "%s"}' "$fp"; fi
        else
            local state=down
            [[ $up == true ]] && state=up
            [[ $name == "$STRANGER" ]] && fp="stranger (no sshd)"
            printf '  %-6s %-14s %-5s %s\n' "$name" "$addr" "$state" "$fp"
        fi
    done
    if (( json )); then
        echo ']}'
    else
        echo "key: $LAB_DIR/id_ed25519   known_hosts: $LAB_DIR/known_hosts"
        [[ -z $workspace ]] || echo "workspace: $workspace"
    fi
}

need_host() {  # NAME [allow-stranger]
    check_lab_dir
    [[ -r $LAB_DIR/hosts.list ]] || die "no lab at $LAB_DIR: run 'scripts/lab.sh up N' first"
    known_node "$1" || die "unknown lab host '$1' (hosts: $(lab_hosts | tr '\n' ' ')$STRANGER)"
    [[ $1 != "$STRANGER" || ${2:-} == allow-stranger ]] || die "$STRANGER has no sshd"
}

forget_neighbour() {  # NAME: drop every cached ARP entry for NAME's address
    local name=$1 addr other
    addr=$(address_of "$name")
    ip neigh del "$addr" dev "$BRIDGE" 2>/dev/null || true
    for other in $(lab_hosts) "$STRANGER"; do
        [[ $other == "$name" ]] || ip -n "$(netns_of "$other")" neigh del "$addr" dev eth0 2>/dev/null || true
    done
}

cmd_stop_host() {
    local name=${1:-} pid child comm deadline holder
    [[ -n $name && $# -eq 1 ]] || usage
    need_host "$name"
    if pid=$(sshd_pid "$name"); then
        # The listener and its per-connection children: open sessions drop, as
        # they would when the host dies.
        local victims=("$pid")
        for child in $(pgrep -P "$pid" 2>/dev/null || true); do
            { read -r comm < "/proc/$child/comm"; } 2>/dev/null || continue
            [[ $comm == sshd ]] && victims+=("$child")
        done
        kill -TERM "${victims[@]}" 2>/dev/null || true
        deadline=$(( EPOCHSECONDS + 5 ))
        while alive "$pid" && (( EPOCHSECONDS < deadline )); do nap 0.01; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$(host_dir "$name")/state/sshd.pid"
    ip link set dev "$(veth_of "$name")" down
    # With a cached MAC, connections would retry SYNs into the void for a
    # minute instead of failing within a second.
    forget_neighbour "$name"
    if holder=$(holder_pid "$name"); then
        deadline=$(( EPOCHSECONDS + 5 ))
        while listening_22 "$holder"; do
            (( EPOCHSECONDS < deadline )) || die "$name: port 22 still listening"
            nap 0.01
        done
    fi
    echo "$name stopped (sshd down, link down)"
}

cmd_start_host() {
    local name=${1:-}
    [[ -n $name && $# -eq 1 ]] || usage
    need_host "$name"
    ip link set dev "$(veth_of "$name")" up
    if sshd_pid "$name" >/dev/null; then
        wait_link_ready "$name"
        echo "$name already running"
        return 0
    fi
    start_sshd "$name"
    wait_link_ready "$name"
    # Entries left FAILED by attempts made while the host was down would fail
    # the next connection at once.
    forget_neighbour "$name"
    echo "$name started"
}

cmd_exec() {
    local name=${1:-} holder
    [[ -n $name && $# -ge 2 ]] || usage
    shift
    need_host "$name" allow-stranger
    holder=$(holder_pid "$name") || die "$name: its namespace holder is gone; run down and up again"
    # An SSH session's view: the host's namespaces, root's home as the working
    # directory and sshd's environment for root (not the caller's).
    exec env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/bash \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin ${LANG:+LANG=$LANG} \
        nsenter -t "$holder" -n -m -u -w -- "$@"
}

# Daemons of the lab must not keep open what our caller handed us (say a
# pipe that `lab.sh up | tee log` waits on to close): keep only 0, 1, 2.
close_inherited_fds() {
    local path fd fds=()
    for path in /proc/$$/fd/*; do
        fd=${path##*/}
        if [[ $fd =~ ^[0-9]+$ ]] && (( fd > 2 && fd != 255 )); then fds+=("$fd"); fi
    done
    for fd in "${fds[@]}"; do eval "exec $fd>&-" 2>/dev/null || true; done
}

# Commands that change the lab take turns (fd 9, closed for the daemons the
# lab starts), so a `down` never runs in the middle of an `up`.
lock_lab() {
    close_inherited_fds
    exec 9<"${BASH_SOURCE[0]}"
    flock -w 300 9 || die "another lab command has held the lab lock for 300 s"
    exec {NAP_FD}<> <(:)
}

main() {
    local cmd=${1:-}
    [[ -n $cmd ]] || usage
    shift
    case "$cmd" in
        up) lock_lab; cmd_up "$@" ;;
        down) [[ $# -eq 0 ]] || usage; lock_lab; cmd_down ;;
        status) cmd_status "$@" ;;
        stop-host) lock_lab; cmd_stop_host "$@" ;;
        start-host) lock_lab; cmd_start_host "$@" ;;
        exec) cmd_exec "$@" ;;
        -h|--help|help) help ;;
        *) usage ;;
    esac
}

main "$@"
