# Sourced by the launch scripts.
#
# check_options NUM_PROCESSES OPTIONS...: bad hnmix.train options are one line and exit 2 before
# the launcher starts (torch's elastic agent would report the trainers' exit code 2 as a failure
# table and exit 1). See hnmix/train/preflight.py.
#
# run_stop_aware DIR_OUT COMMAND... runs COMMAND (a launcher) in
# the background, forwards SIGTERM and SIGINT to it, waits for it to end, and exits 75 when the
# trainer stopped on a signal after saving (it leaves DIR_OUT/STOPPED), else with COMMAND's code.
# Launchers do not pass 75 on themselves: torch's elastic agent exits 1 after a signal.
# Workers get TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds between the agent's SIGTERM and its SIGKILL
# (torch's default, 30, is shorter than a save plus hnmix's 60 s wait for a Hub upload).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-150}

run_stop_aware() {
  local dir_out=$1
  shift
  rm -f "$dir_out/STOPPED"
  "$@" &
  local launcher=$! status=0
  trap 'kill -TERM "$launcher" 2>/dev/null' TERM INT
  wait "$launcher" || status=$?
  while kill -0 "$launcher" 2>/dev/null; do  # a trapped signal ended `wait` early: wait again
    status=0
    wait "$launcher" || status=$?
  done
  trap - TERM INT
  if [ -f "$dir_out/STOPPED" ]; then
    cat "$dir_out/STOPPED" >&2
    exit 75
  fi
  exit "$status"
}

check_options() {
  local num_processes=$1
  shift
  python -m hnmix.train.preflight --num_processes "$num_processes" "$@" || exit $?
}
