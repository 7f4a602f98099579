#!/usr/bin/env bash
# Print the path of a Python 3.12 interpreter: python3.12 on PATH, else pyenv's newest 3.12.
set -u
if command -v python3.12 >/dev/null 2>&1 && python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
  command -v python3.12; exit 0
fi
root=${PYENV_ROOT:-$HOME/.pyenv}
for v in $(ls -d "$root"/versions/3.12* 2>/dev/null | sort -V -r); do
  if [ -x "$v/bin/python3.12" ]; then echo "$v/bin/python3.12"; exit 0; fi
done
echo "error: Python 3.12 not found (tried python3.12 on PATH and $root/versions/3.12*)" >&2
exit 1
