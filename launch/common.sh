# Sourced by the launch scripts: errors, --dry-run, printing and running commands, quoting.
# Every command a script runs is printed first, as "+ command" on stderr, quoted so that it
# can be pasted into a shell; with --dry-run (the scripts' first argument) it is only printed.

DRY_RUN=0

# die MESSAGE: one error line on stderr, exit status 2 (bad input).
die() {
  echo "error: $*" >&2
  exit 2
}

# quote_word WORD: WORD as the shell reads it back: as it is if it holds only safe
# characters, else in single quotes (a quote inside becomes '\'').
quote_word() {
  local word=$1 q="'"
  if [[ $word =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//$q/$q\\$q$q}"
  fi
}

# quoted WORD...: the words as one shell-quoted string; nothing at all for no words, so that
# no empty argument appears where no extra arguments were given.
quoted() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote_word "$word")"
  done
  printf '%s' "$out"
}

# run COMMAND...: prints the command, then runs it unless this is a dry run.
run() {
  printf '+ %s\n' "$(quoted "$@")" >&2
  if [[ $DRY_RUN == 1 ]]; then return 0; fi
  "$@"
}

# run_exec COMMAND...: prints the command, then replaces the script with it (so that the
# trainer itself gets SIGTERM and Ctrl-C), unless this is a dry run.
run_exec() {
  printf '+ %s\n' "$(quoted "$@")" >&2
  if [[ $DRY_RUN == 1 ]]; then exit 0; fi
  exec "$@"
}

# run_with_input TEXT COMMAND...: prints the command with TEXT as its here-document, then
# runs it with TEXT on stdin unless this is a dry run.
run_with_input() {
  local text=$1
  shift
  printf "+ %s <<'END_OF_INPUT'\n%s\nEND_OF_INPUT\n" "$(quoted "$@")" "$text" >&2
  if [[ $DRY_RUN == 1 ]]; then return 0; fi
  "$@" <<< "$text"
}

# train_command PYTHON CONFIG WORKDIR [ARG...]: the trainer's command line, shell-quoted.
train_command() {
  local python=$1 config=$2 workdir=$3
  shift 3
  quoted "$python" -m lcm_jax.train "--config=$config" "--workdir=$workdir" "$@"
}
