"""The ``ckpt-surgeon`` command line: a thin layer over the Python API.

Core commands (inspect, convert, plugins) live here; every surgery command comes from a plugin,
loaded lazily the first time the CLI lists or runs commands (Flask style), so ``--help`` stays
fast and a broken plugin only costs its own commands.

Exit codes: 0 success; 1 a negative finding (diff: differences, verify: not equivalent, scan:
unsafe globals); 2 any error, reported as one line on stderr (``--debug`` shows the traceback).
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .cliutil import emit, json_option, load_options, state, write_options
from .errors import EXIT_ERROR, CkptSurgeonError, missing_dependency
from .gcpause import freeze_heap

CORE_COMMANDS = ("inspect", "convert", "plugins")
_STANDALONE = False  # set by console_main: this process ends with the command


def _one_line(message: str) -> str:
    return " ".join(message.split()).rstrip(".")


class LazyGroup(click.Group):
    def main(self, args=None, prog_name=None, **extra):
        """click's main, with its own errors (a missing or invalid option, an unknown command) in
        one line on stderr like every other error, instead of a usage block; exit code 2 as click's."""
        extra.pop("standalone_mode", None)
        from .safeout import safe_output

        with safe_output():
            self._main(args, prog_name, **extra)

    def _main(self, args, prog_name, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `ckpt-surgeon` (click >= 8.2): the help
                click.echo(e.format_message(), err=True)
                sys.exit(e.exit_code)
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "ckpt-surgeon")
            click.echo(f"ckpt-surgeon: error: {_one_line(e.format_message())} (see: {where} --help)", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"ckpt-surgeon: error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C or end of input while click itself was reading
            click.echo("ckpt-surgeon: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def _plugin_commands(self) -> dict:
        from .manager import get_manager

        m = get_manager()
        cmds = {}
        for name, (cmd, _plugin) in m.commands().items():
            if name in self.commands:
                msg = f"command {name!r} from plugin {_plugin!r} clashes with a core command; core kept"
                if msg not in m.conflicts:
                    m.conflicts.append(msg)
                continue
            cmds[name] = cmd
        return cmds

    def list_commands(self, ctx):
        return sorted(set(self.commands) | set(self._plugin_commands()))

    def get_command(self, ctx, name):
        if name in self.commands:
            cmd = self.commands[name]
        else:  # only the plugin that provides it is imported (see manager.Manager)
            from .manager import get_manager

            found = get_manager().command(name)
            cmd = found[0] if found is not None else None
        if cmd is not None:
            _accept_global_flags(cmd)
            if _STANDALONE:  # modules and plugins are in: later collections walk only what the command makes
                freeze_heap()  # (not in a process that goes on after the command: frozen cycles are never freed)
        return cmd

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CkptSurgeonError as e:
            debug = state(ctx).get("debug", False)
            if debug:
                import traceback

                traceback.print_exc()
            click.echo(f"ckpt-surgeon: error: {e.one_line()}", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("ckpt-surgeon: interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # stdout closed by its reader (| head): nothing more to say, no error
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
            ctx.exit(1)
        except RecursionError:  # only a (hostile) input nested thousands of levels deep gets here
            debug = state(ctx).get("debug", False)
            if debug:
                import traceback

                traceback.print_exc()
            click.echo("ckpt-surgeon: error: the input is nested too deeply to process "
                       "(more levels than Python's recursion limit)", err=True)
            ctx.exit(EXIT_ERROR)
        except Exception as e:  # a bug: still one line unless --debug
            debug = state(ctx).get("debug", False)
            if debug:
                import traceback

                traceback.print_exc()
            msg = " ".join(str(e).split())[:400]
            missing = missing_dependency(e)
            if _out_of_memory(e):  # not a bug: the machine ran short (an allocation torch or Python refused)
                click.echo(f"ckpt-surgeon: error: out of memory: {msg or type(e).__name__} (free memory, or make "
                           "the job smaller: a torch zip output keeps tensor views as they are)", err=True)
            elif missing:  # an install without one of our dependencies (torch is one; most commands never import it)
                click.echo(f"ckpt-surgeon: error: this needs {missing}, which is not installed here "
                           f"(pip install {missing})", err=True)
            else:
                click.echo(f"ckpt-surgeon: internal error: {type(e).__name__}: {msg} (re-run with --debug for details)",
                           err=True)
            ctx.exit(EXIT_ERROR)


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation refused for want of memory (Python's MemoryError, torch's
    CPU allocator error, numpy's _ArrayMemoryError, an mmap's ENOMEM)."""
    if isinstance(e, MemoryError):
        return True
    if isinstance(e, OSError) and e.errno == 12:  # ENOMEM
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "not enough memory" in text
                                            or "DefaultCPUAllocator" in text)


def _set_global_flag(ctx, param, value):
    if value:
        state(ctx)[param.name] = True


def _accept_global_flags(cmd: click.Command) -> None:
    """-q/--quiet and --debug after the command name too (``ckpt-surgeon convert a.pt -o b.pt -q``),
    with the same effect as before it; added once per command, where the command has no such option."""
    taken = {opt for p in cmd.params for opt in getattr(p, "opts", ())}
    if "--quiet" not in taken and "-q" not in taken:
        cmd.params.append(click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_set_global_flag,
                                       help="No progress bars or notes (also accepted before the command)."))
    if "--debug" not in taken:
        cmd.params.append(click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_global_flag,
                                       is_eager=True, help="Show tracebacks for errors (also before the command)."))


@click.group(cls=LazyGroup, name="ckpt-surgeon", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="ckpt-surgeon")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes.")
@click.pass_context
def main_group(ctx, debug, quiet):
    """PyTorch checkpoint surgery: inspect, strip prefixes, rename, extract, convert, diff, verify.

    \b
    Examples:
      ckpt-surgeon inspect model_dp.pt
      ckpt-surgeon strip-prefix model_dp.pt -o model.pt
      ckpt-surgeon extract resnet.pt -o backbone.pt --layers conv1,layer1
      ckpt-surgeon diff a.pt b.safetensors
    """
    obj = state(ctx)
    obj["debug"], obj["quiet"] = debug, quiet
    if not debug:  # a library's warning (torch deprecations...) as one line, not a source dump
        import warnings

        warnings.showwarning = _one_line_warning
    from .manager import get_manager

    m = get_manager()
    for p in m.problems:
        click.echo(f"ckpt-surgeon: warning: {p}", err=True)
    m.echo = lambda p: click.echo(f"ckpt-surgeon: warning: {p}", err=True)  # a plugin imported later


_WARNED: set = set()


#: torch's deprecations of APIs that torch itself calls when it rebuilds a file's tensors (a
#: quantized model's weights): nothing the user did or can change, so not shown
_TORCH_INTERNAL = ("torch.quantize_per_tensor, torch.quantize_per_channel and other quantized tensor creation",
                   "TypedStorage is deprecated")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    if text in _WARNED or text.startswith(_TORCH_INTERNAL):  # the same one from each call site: said once
        return
    _WARNED.add(text)
    print(f"ckpt-surgeon: warning: {text[:300]}", file=file or sys.stderr)


@main_group.command("inspect")
@click.argument("path")
@load_options
@json_option
@click.option("--depth", default=2, show_default=True, type=click.IntRange(min=1), help="Module tree depth.")
@click.option("--values", is_flag=True, help="Also read tensors and report NaN/Inf (reads all data).")
@click.option("--tensors", "list_tensors", is_flag=True,
              help="List every tensor: name, dtype, shape, size (instead of the module table).")
@click.option("--match", multiple=True, metavar="PATTERN",
              help="List only the tensors a module path, glob or re:regex names (repeatable; implies --tensors).")
def inspect_cmd(path, key, trust_pickle, as_json, depth, values, list_tensors, match):
    """Summarise a checkpoint without reading tensor data.

    \b
    Example:
      ckpt-surgeon inspect samples/out/seednet_dp.pt --json
      ckpt-surgeon inspect model.safetensors --match '*norm*'
    """
    from .inspect_view import print_inspect
    from .summary import inspect

    info = inspect(path, depth=depth, values=values, key=key, trust_pickle=trust_pickle, tensors=list_tensors,
                   match=match)
    emit(info, as_json, print_inspect)


@main_group.command("convert")
@click.argument("path")
@load_options
@write_options
@json_option
def convert_cmd(path, key, trust_pickle, as_json, **write):
    """Re-write a checkpoint in another format (torch zip, safetensors, sharded folder).

    \b
    Example:
      ckpt-surgeon convert model.pt -o model.safetensors
      ckpt-surgeon convert big.pt -o big_hf/ --max-shard-size 2GB
    """
    from . import cliutil
    from .errors import AmbiguousStateDictError
    from .keys import name_list

    try:
        ck = cliutil.load(path, key, trust_pickle)
        kept = None
    except AmbiguousStateDictError as e:
        # a torch file keeps the whole wrapper whichever state dict is chosen: nothing to choose
        kept = e.candidates
        if key is not None or not kept:
            raise
        if not cliutil.keeps_wrapper(write, e.overview):
            if write.get("output") and e.message.startswith("several state dicts"):
                keep = "leave out --state-dict-only" if write.get("state_dict_only") else "write a torch file (.pt)"
                e.hint = f"choose one with --key, or {keep} to keep them all in their wrapper{e.together}"
            raise
        ck = cliutil.load(path, kept[0], trust_pickle)
        said = (f"several state dicts ({name_list(kept)}): all kept in their wrapper as they are"
                if e.message.startswith("several state dicts") else f"{e.message}: the whole file kept as it is")
    rep = cliutil.save(ck, **write)
    if kept:
        rep["state_dicts"] = kept
        rep.setdefault("notes", []).insert(0, said)
    emit(rep, as_json, cliutil.echo_save)


@main_group.command("plugins")
@json_option
def plugins_cmd(as_json):
    """List loaded plugins, where they come from, and the hooks they implement.

    \b
    Example:
      ckpt-surgeon plugins --json
    """
    from .manager import get_manager

    m = get_manager()
    m.load_all()
    provided = {
        "formats": {k: p for k, (_, p) in m.formats().items()},
        "commands": {k: p for k, (_, p) in m.commands().items()},
        "operations": {k: p for k, (_, p) in m.operations().items()},
        "model_transforms": {k: p for k, (_, p) in m.model_transforms().items()},
    }
    report = {
        "plugins": [vars(i) for i in m.infos],
        "provides": provided,
        "conflicts": list(m.conflicts),
        "problems": list(m.problems),
    }

    def human(r):
        from rich.table import Table

        from .cliutil import console

        t = Table("plugin", "module", "distribution", "status", "hooks")
        for col in t.columns:
            col.overflow = "fold"
        for p in r["plugins"]:
            dist = f"{p['distribution']} {p['version']}".strip()
            hooks = ", ".join(h.replace("ckptsurgeon_", "") for h in p["hooks"])
            t.add_row(p["name"], p["module"], dist, p["status"] + (f": {p['error']}" if p["error"] else ""), hooks)
        c = console()
        c.print(t)
        for kind, items in r["provides"].items():
            c.print(f"{kind}: " + ", ".join(f"{k} ({v})" for k, v in sorted(items.items())))
        for x in r["conflicts"]:
            c.print(f"conflict: {x}")

    emit(report, as_json, human)


def main(argv=None):
    """Run the CLI in this process (raises SystemExit like any click program)."""
    return main_group.main(args=argv, prog_name="ckpt-surgeon")


def console_main() -> None:
    """Console-script entry point: :func:`main`, then a fast exit.

    Tearing the interpreter down (clearing ~150 modules, a last garbage collection) cost 35-40 ms
    per run here, a sixth of a whole strip-prefix of a small checkpoint. By the time a command
    returns, its outputs are written, closed and renamed into place, so once stdout and stderr
    are flushed and anything registered with :mod:`atexit` has run, nothing is left for the
    teardown to do. A process with other threads still running (a plugin's) exits normally.
    """
    global _STANDALONE
    _STANDALONE = True
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): printed, status 1, as Python does
        print(code, file=sys.stderr)
        code = 1
    import threading

    if threading.active_count() > 1:
        sys.exit(code)
    import atexit
    import os

    try:
        atexit._run_exitfuncs()  # what Python's own shutdown would run first
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BrokenPipeError:  # stdout closed by a reader (| head): nothing more to say
        code = code or 1
    except Exception:  # an exit hook or a stream that misbehaves: let Python report it
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    console_main()
