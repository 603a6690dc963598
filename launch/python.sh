# Sourced by launch/torchrun.sh and launch/deepspeed.sh: pick_python sets `python` to the interpreter and
# `python_why` to the reason: PYTHON, else the active environment's python (VIRTUAL_ENV, CONDA_PREFIX), else
# this checkout's .venv (what `make install` builds), else the system's python.
# shellcheck shell=bash disable=SC2034  # python and python_why are read by the script that sources this
pick_python() {
  local venv
  venv=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python
  if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON python_why="PYTHON"
  elif [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]; then
    python=python python_why="the active environment ${VIRTUAL_ENV:-${CONDA_PREFIX:-}}"
  elif [ -x "$venv" ]; then
    python=$venv python_why="the checkout's .venv; PYTHON=... picks another"
  else
    python=python python_why="no PYTHON, no active environment and no .venv (make install): the system's"
  fi
}
