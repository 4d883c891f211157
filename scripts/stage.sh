#!/usr/bin/env bash
# Run a command as a named stage: its wall time goes to $STAGE_TIMES (one "seconds name" line
# per stage, read by .ci/run), and its exit status is kept.
# Usage: scripts/stage.sh NAME COMMAND [ARGS...]
set -uo pipefail
name=$1
shift
began=$(date +%s)
"$@"
status=$?
echo "$(( $(date +%s) - began )) $name$([ "$status" -eq 0 ] || echo " (failed, status $status)")" >> "${STAGE_TIMES:-.stage-times}"
exit "$status"
