"""Run commands, each in its own process, as `python -m MODULE ...` / `python SCRIPT ...` would.

    python tests/forked_commands.py RESULTS.json "-m experts.train DATA" "infer.py x.jpg" ...

Writes [{"command", "returncode", "stdout", "stderr"}, ...] to RESULTS.json. The heavy
libraries (torch, timm, diffusers...) are imported once here and every command runs in a
child forked from this process, as the `__main__` module, with its own stdout, stderr and
exit status. A separate `python` per command would spend about 5 s of CPU importing torch
each; the tests run fifteen of them.
"""
import json
import os
import runpy
import sys
import tempfile
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELOADED = ("torch", "timm", "sklearn.metrics", "albumentations", "matplotlib.figure", "diffusers", "transformers")


def run_as_main(argv: list[str]) -> None:
    """What the interpreter does with `python -m MODULE args` or `python SCRIPT args`."""
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def exit_status(exit_: SystemExit) -> int:
    if exit_.code is None or isinstance(exit_.code, int):
        return exit_.code or 0
    print(exit_.code, file=sys.stderr)  # sys.exit("message"): the interpreter prints it, status 1
    return 1


def run_forked(argv: list[str], folder: str) -> dict:
    out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            for path, fd in ((out, 1), (err, 2)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            run_as_main(argv)
            status = 0
        except SystemExit as exit_:
            status = exit_status(exit_)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    _, wait_status = os.waitpid(pid, 0)
    with open(out) as stdout, open(err) as stderr:
        return {"command": " ".join(argv), "returncode": os.waitstatus_to_exitcode(wait_status),
                "stdout": stdout.read(), "stderr": stderr.read()}


def main() -> None:
    results_path, commands = sys.argv[1], sys.argv[2:]
    os.chdir(ROOT)
    sys.path[0] = ROOT  # as for `python -m` in the repository root (not this file's folder)
    for name in PRELOADED:
        __import__(name)
    with tempfile.TemporaryDirectory() as folder:
        results = [run_forked(command.split(), folder) for command in commands]
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
