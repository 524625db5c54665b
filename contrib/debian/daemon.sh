# Running `sharedloop serve` processes without systemd: spliced into the
# maintainer scripts by scripts/build-deb. (With systemd, sharedloop.service
# runs the daemon and these are not used.)

# The pids, one a line, of the `sharedloop serve` processes of this mount
# namespace that run the packaged binary, or the copy scripts/setup
# installed in /usr/local/sbin before there was a package. Processes of
# other mount namespaces (containers, test hosts) are theirs.
sharedloop_serves() {
    _ns=$(readlink /proc/self/ns/mnt)
    for _d in /proc/[0-9]*; do
        _exe=$(readlink "$_d/exe" 2>/dev/null) || continue
        case "${_exe% (deleted)}" in
            /usr/sbin/sharedloop | /usr/local/sbin/sharedloop) ;;
            *) continue ;;
        esac
        [ "$(readlink "$_d/ns/mnt" 2>/dev/null)" = "$_ns" ] || continue
        tr '\0' '\n' <"$_d/cmdline" 2>/dev/null | grep -qx serve || continue
        echo "${_d#/proc/}"
    done
}

# The paths of the unix sockets process $1 listens on.
sharedloop_sockets() {
    _inodes=" "
    for _f in /proc/"$1"/fd/*; do
        _l=$(readlink "$_f" 2>/dev/null) || continue
        case "$_l" in
            socket:\[*\]) _l=${_l#socket:[}; _inodes="$_inodes${_l%]} " ;;
        esac
    done
    awk -v inodes="$_inodes" 'NR > 1 && $4 == "00010000" && NF >= 8 && index(inodes, " " $7 " ") { print $8 }' \
        /proc/net/unix
}

# Stops process $1 (SIGTERM; SIGKILL after 30 s) and waits until it is
# gone. Layer mounts stay: running containers keep their filesystems.
sharedloop_stop() {
    kill -TERM "$1" 2>/dev/null || return 0
    _i=0
    while readlink "/proc/$1/exe" >/dev/null 2>&1; do
        _i=$((_i + 1))
        if [ "$_i" = 300 ]; then
            echo "sharedloop: pid $1 did not stop in 30 s; killing it" >&2
            kill -KILL "$1" 2>/dev/null || true
        fi
        [ "$_i" -lt 400 ] || break
        sleep 0.1
    done
}

# Restarts every running serve with /usr/sbin/sharedloop, the same
# arguments, working directory and SHAREDLOOP_*/RUST_*/PATH environment, in
# the background (its own session) with output appended to
# /var/log/sharedloop.log; waits until it listens on the old one's sockets
# again. A restarted daemon adopts the layer mounts: containers keep running.
sharedloop_restart() {
    for _pid in $(sharedloop_serves); do
        _tmp=$(mktemp -d)
        cp "/proc/$_pid/cmdline" "$_tmp/cmdline" || { rm -rf "$_tmp"; continue; }
        grep -z -E '^(PATH|SHAREDLOOP_[A-Za-z0-9_]*|RUST_[A-Za-z0-9_]*)=' "/proc/$_pid/environ" >"$_tmp/env" || true
        _cwd=$(readlink "/proc/$_pid/cwd" 2>/dev/null) || _cwd=/
        _socks=$(sharedloop_sockets "$_pid")
        echo "sharedloop: restarting sharedloop serve (pid $_pid) with the new /usr/sbin/sharedloop" >&2
        sharedloop_stop "$_pid"
        (
            cd "$_cwd" 2>/dev/null || cd /
            {
                cat "$_tmp/env"
                printf '%s\0' /usr/sbin/sharedloop
                tail -z -n +2 "$_tmp/cmdline"
            } | xargs -0 setsid -f env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                >>/var/log/sharedloop.log 2>&1
        )
        rm -rf "$_tmp"
        _i=0
        for _s in $_socks; do
            until awk -v p="$_s" '$4 == "00010000" && $8 == p { f = 1 } END { exit !f }' /proc/net/unix; do
                _i=$((_i + 1))
                if [ "$_i" -ge 300 ]; then
                    echo "sharedloop: the restarted daemon does not listen on $_s; see /var/log/sharedloop.log" >&2
                    break
                fi
                sleep 0.1
            done
        done
    done
}
