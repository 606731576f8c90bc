#!/bin/sh
# drover's main job on the embedded default: submit a few tasks, run a worker
# until the queue is empty, show what happened. Uses its own queue directory,
# so it can be run again and again.
set -eu
cd "$(dirname "$0")/.."
drover() { node bin/drover.js "$@"; }
export DROVER_QUEUE_DIR=.drover/demo DROVER_WORK_DIR=.drover/demo/work
rm -rf .drover/demo

echo "== submitting 6 tasks"
drover submit -- 'echo "hello from $TASK_ID"; uname -a' >/dev/null
drover submit -- sh -c 'for i in 1 2 3; do echo "step $i"; sleep 0.2; done' >/dev/null
drover submit -- 'ls -la' >/dev/null
drover submit -- 'echo "this one fails" >&2; exit 3' >/dev/null
drover submit --max-run-time 1 -- 'sleep 30' >/dev/null
first=$(drover submit -- date)

echo "== running a worker with capacity 4 until the queue is empty"
drover worker --once --capacity 4 --log-level warn

echo "== drover tasks"
drover tasks
echo "== drover logs $first"
drover logs "$first"
