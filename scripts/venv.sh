# Sourced by scripts/install.sh and scripts/install_vllm_env.sh: the environment and pin settings they share.
# In: DEFAULT_VENV, DEFAULT_CONSTRAINTS; the caller's VENV, CONSTRAINTS, PYTHON override them (see each script).
# Out: venv (created when missing), py (its python), pin (pip's -c option, empty with CONSTRAINTS=none).
venv="${VENV:-$DEFAULT_VENV}"
constraints="${CONSTRAINTS:-$DEFAULT_CONSTRAINTS}"
pin=()
[ "$constraints" = none ] || pin=(-c "$constraints")

if [ ! -x "$venv/bin/python" ]; then
  python="${PYTHON:-$(command -v python3.11 || command -v python3)}"
  echo "creating $venv with $python"
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
