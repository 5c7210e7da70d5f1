#!/bin/sh
# Entry point of the gateway image: `cleanplate ARGS...`, `serve` when there are no arguments or only
# options (`docker run IMAGE --max-batch 4`). `exec` makes cleanplate PID 1, so SIGTERM reaches the
# gateway itself and starts its drain (503 to new requests, in-flight ones finish, exit 0).
set -eu
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- serve "$@"
fi
exec cleanplate "$@"
