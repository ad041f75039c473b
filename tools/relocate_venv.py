"""Point a virtual environment built in one directory at the directory it will run from.

    python3 tools/relocate_venv.py BUILT FINAL

`make install` builds the venv in $(DESTDIR)$(VENVDIR).new (a staging root, and a new directory beside
a working install so that a failed build leaves that install alone), then moves it. Python finds a
venv from its pyvenv.cfg next to bin/, so the interpreter and the installed packages work from any
directory; what carries the build directory's absolute path is text: the console scripts' shebangs
(bin/vpnd, bin/pip, ...), the activate scripts and pyvenv.cfg's `command` line. This rewrites BUILT to
FINAL in every regular text file under BUILT (never through a symlink: bin/python links to the
machine's interpreter), then compiles the .py files again so that the .pyc files name FINAL too (the
import system would correct a code object's file name anyway, but no file then names the staging
directory, which packaging tools check). Run it with the built venv's Python, whose bytecode the
.pyc files must be.
"""

from __future__ import annotations

import compileall
import os
import sys


def relocate(built: str, final: str) -> list[str]:
    old, new = os.fsencode(os.path.abspath(built)), os.fsencode(final)
    changed = []
    for top, dirs, files in os.walk(built):          # os.walk does not descend into symlinked dirs
        for name in files:
            path = os.path.join(top, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            if old not in data or b"\0" in data:       # binary files (.pyc, .so) are left alone
                continue
            st = os.stat(path)
            tmp = path + ".relocate-tmp"
            with open(tmp, "wb") as f:
                f.write(data.replace(old, new))
            os.chmod(tmp, st.st_mode & 0o7777)
            os.replace(tmp, path)
            changed.append(path)
    return changed


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not os.path.isabs(argv[1]) or not os.path.isfile(os.path.join(argv[0], "pyvenv.cfg")):
        print("usage: relocate_venv.py BUILT_VENV_DIR FINAL_ABSOLUTE_DIR", file=sys.stderr)
        return 2
    changed = relocate(argv[0], argv[1])
    built = os.path.abspath(argv[0])
    ok = compileall.compile_dir(os.path.join(built, "lib"), quiet=1, force=True, stripdir=built, prependdir=argv[1])
    print(f"relocate_venv: {len(changed)} text files now name {argv[1]}; bytecode compiled for it again")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
