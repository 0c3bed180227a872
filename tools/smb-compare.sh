#!/usr/bin/env bash
# make smb-compare: Samba's own smbtorture suites against Samba's smbd and
# against rksmbd (+ filterd), on this machine, side by side.
#
# Usage: tools/smb-compare.sh BIN_DIR [SUITE...]
#
# Starts smbd on a loopback port with a generated smb.conf (an equivalent
# share: read-write, leases, durable handles; Samba cannot offer a
# continuously-available share) and a tdbsam user added with
# `smbpasswd -a`, and filterd + rksmbd on a temporary export with the same
# user; runs each suite against both (in parallel, a fresh export each)
# and prints passed/total per suite. Logs stay in the temporary directory
# when KEEP=1. Needs smbd (Debian `samba`) and smbtorture
# (`samba-testsuite`); the Makefile installs them. Not part of `make test`.
set -euo pipefail

BIN=${1:?usage: smb-compare.sh BIN_DIR [SUITE...]}
shift
SUITES=("$@")
[ ${#SUITES[@]} -gt 0 ] || SUITES=(smb2.durable-v2-open smb2.durable-open smb2.lease smb2.lock smb2.replay smb2.credits smb2.create smb2.read smb2.sharemode smb2.getinfo smb2.rename smb2.notify smb2.ioctl)
SUITE_TIMEOUT=${SUITE_TIMEOUT:-900}

for tool in smbd smbtorture smbpasswd; do
  command -v "$tool" >/dev/null 2>&1 || { echo "smb-compare: $tool is not installed (apt-get install samba samba-testsuite)" >&2; exit 1; }
done
for b in filterd rksmbd; do
  [ -x "$BIN/$b" ] || { echo "smb-compare: $BIN/$b not built" >&2; exit 1; }
done

D=$(mktemp -d "${TMPDIR:-/tmp}/smb-compare.XXXXXX")
D=$(cd "$D" && pwd) # absolute: smbtorture runs in a directory of its own
PIDS=()
cleanup() {
  # SIGTERM first: smbd then stops the children it forked.
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "logs kept in $D"; else rm -rf "$D"; fi
}
trap cleanup EXIT INT TERM

USER_NAME=$(id -un)
PASSWORD="cmp-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"

# A free loopback port (the kernel's pick, released again).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_port() { # PORT WHAT LOG
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "smb-compare: $2 did not listen on port $1; its log:" >&2
  tail -n 30 "$3" >&2 || true
  exit 1
}

# --- Samba ---------------------------------------------------------------
S="$D/samba"
mkdir -p "$S"/{private,lock,state,cache,run,ncalrpc,share}
SAMBA_PORT=$(free_port)
cat >"$S/smb.conf" <<EOF
[global]
  server role = standalone server
  passdb backend = tdbsam:$S/private/passdb.tdb
  private dir = $S/private
  lock directory = $S/lock
  state directory = $S/state
  cache directory = $S/cache
  pid directory = $S/run
  ncalrpc dir = $S/ncalrpc
  binddns dir = $S/private
  log file = $S/log.%m
  smb ports = $SAMBA_PORT
  interfaces = lo
  bind interfaces only = yes
  disable netbios = yes
  server min protocol = SMB2_10
  load printers = no
  printcap name = /dev/null
  disable spoolss = yes
  # leases and durable handles need Samba's own share modes and locks
  kernel oplocks = no
  kernel share modes = no
  posix locking = no
  smb2 leases = yes
  durable handles = yes
[data]
  path = $S/share
  read only = no
EOF
printf '%s\n%s\n' "$PASSWORD" "$PASSWORD" | smbpasswd -c "$S/smb.conf" -s -a "$USER_NAME" >/dev/null
smbd --foreground -s "$S/smb.conf" </dev/null >"$S/smbd.out" 2>&1 &
PIDS+=($!)
wait_port "$SAMBA_PORT" smbd "$S/smbd.out"
echo "Samba $(smbd --version | sed 's/^Version //') on 127.0.0.1:$SAMBA_PORT" >&2

# --- rksmbd --------------------------------------------------------------
R="$D/rk"
mkdir -p "$R"
# 0600 (the umask in a subshell): rksmbd refuses a users file group or
# others may read or write.
(umask 077; printf '%s\n' "$PASSWORD" | "$BIN/rksmbd" hash-password "$USER_NAME" >"$R/smbpasswd")

# Starts a fresh filterd + rksmbd on export $R/N; sets RK_PORT.
start_rksmbd() { # N
  local dir="$R/$1" line=""
  mkdir -p "$dir/root" "$dir/state"
  "$BIN/filterd" --root "$dir/root" --state "$dir/state" --no-fanotify </dev/null >"$dir/filterd.out" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 300); do
    [ -S "$dir/state/filterd.sock" ] && break
    sleep 0.1
  done
  "$BIN/rksmbd" --filter "$dir/state/filterd.sock" --listen 127.0.0.1:0 --instance rksmbd \
    --share data --users "$R/smbpasswd" </dev/null >"$dir/rksmbd.out" 2>"$dir/rksmbd.err" &
  PIDS+=($!)
  for _ in $(seq 1 300); do
    line=$(head -n 1 "$dir/rksmbd.out")
    [ -n "$line" ] && break
    sleep 0.1
  done
  case "$line" in
    "listening on "*) RK_PORT=${line##*:} ;;
    *) echo "smb-compare: rksmbd did not start:" >&2; cat "$dir/rksmbd.err" "$dir/filterd.out" >&2; exit 1 ;;
  esac
}

# Runs SUITE against PORT; writes smbtorture's output to OUT (a path
# under $D). smbtorture leaves smbtortureXXXXXX directories in its working
# directory, so it runs in one of its own under $D, not in the caller's.
torture() { # PORT SUITE OUT
  local work
  work=$(mktemp -d "$D/torture.XXXXXX")
  (cd "$work" && timeout "$SUITE_TIMEOUT" smbtorture "//127.0.0.1/data" -p "$1" -s /dev/null \
    -U "$USER_NAME%$PASSWORD" "$2") >"$3" 2>&1 || true
}

# passed/total of an smbtorture output (subunit lines).
count() {
  local passed total
  passed=$(grep -c '^success: ' "$1" || true)
  total=$(grep -c '^test: ' "$1" || true)
  echo "$passed/$total"
}

declare -A SAMBA RK
n=0
for suite in "${SUITES[@]}"; do
  n=$((n + 1))
  echo "running $suite against Samba and rksmbd..." >&2
  rm -rf "${S:?}/share" && mkdir -p "$S/share"
  start_rksmbd "$n"
  torture "$SAMBA_PORT" "$suite" "$D/samba-$suite.out" &
  a=$!
  torture "$RK_PORT" "$suite" "$D/rksmbd-$suite.out" &
  b=$!
  wait "$a" "$b"
  SAMBA[$suite]=$(count "$D/samba-$suite.out")
  RK[$suite]=$(count "$D/rksmbd-$suite.out")
done

printf '\n%-24s %14s %14s\n' "smbtorture suite" "Samba smbd" "rksmbd"
for suite in "${SUITES[@]}"; do
  printf '%-24s %14s %14s\n' "$suite" "${SAMBA[$suite]}" "${RK[$suite]}"
done
echo "(passed/total; each suite in one smbtorture run, a fresh share each; outputs: KEEP=1 keeps $D)"
