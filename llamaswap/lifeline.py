"""Nothing a model started outlives llamaswap, even when llamaswap is SIGKILLed.

Each child is started as ``setsid /bin/sh -c WATCH llamaswap-lifeline CMD...``:
``setsid`` gives it a session and process group of its own (keeping the pid), the
shell forks a *watcher* into that group and then ``exec``\\ s the model's command.
The watcher holds the read end of a pipe on fd 3 whose write end only llamaswap
has (Twisted's ``childFDs={3: "w"}``).  When llamaswap dies, however it dies, the
kernel closes that end; the watcher reads EOF and SIGKILLs its whole group: the
server, a wrapper script and everything the script started, and itself.

It costs one small ``sh`` per running model, and it pins the group id (a group id
is not handed out again while a member lives).  The watcher ignores SIGTERM, SIGINT,
SIGHUP and SIGQUIT, so a script's ``trap 'kill 0' EXIT`` does not take it away
early; a normal stop kills it with the group.

What it cannot cover: a descendant that leaves the group with ``setsid()`` (a
daemonizing server).  Only a cgroup holds such a process; under systemd,
``KillMode=control-group`` (the default) kills it when the service stops.
"""

from __future__ import annotations

LIFELINE_FD = 3
"""The child's fd holding the read end of the lifeline (stdin stays free)."""

# The subshell gets /dev/null for 0-2, so it never holds the model's output pipes;
# `read` returns only at EOF (llamaswap writes nothing), then `kill -KILL 0` takes
# the whole process group.  The server itself gets fd 3 closed before the exec.
WATCH = (
    "( trap '' TERM INT HUP QUIT; read -r _ <&3; kill -KILL 0 ) </dev/null >/dev/null 2>&1 & "
    'exec 3<&-; exec "$@"'
)


def guarded(setsid: str, argv: list[str]) -> list[str]:
    """``argv`` run in its own process group, killed as a whole when llamaswap dies."""
    return [setsid, "/bin/sh", "-c", WATCH, "llamaswap-lifeline", *argv]
