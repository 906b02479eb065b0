"""The magics: parse arguments, call one function that holds the logic, show its result."""

from __future__ import annotations

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Int

from llm_magic.commands.autoload import DEVICE_MAP_CHOICES
from llm_magic.engine.paths import is_closure_note
from llm_magic.names import DTYPE_CHOICES


def split_names(line: str) -> list[str]:
    """Split a magic line on spaces outside brackets and quotes: `d['a b'] -o` -> 2 tokens. A
    closure note pasted with its path stays with it: `f.__closure__[0].cell_contents (closure `m`)`."""
    tokens, current, depth, quote = [], "", 0, None
    for char in line.strip():
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char.isspace() and depth == 0:
            if current:
                tokens.append(current)
            current = ""
            continue
        current += char
    if current:
        tokens.append(current)
    joined: list[str] = []
    for token in tokens:
        if joined and is_closure_note(token):
            joined[-1] += " " + token
        else:
            joined.append(token)
    return joined


@magics_class
class LLMMagic(Magics):
    """Settings, e.g. `%config LLMMagic.strict = True`."""

    strict = Bool(False, help="Refuse a load predicted to put any module on a slower tier (cpu/disk).").tag(config=True)
    small_holder_bytes = Int(1 << 20, help="%gpustate leaves out holders smaller than this unless --all.").tag(config=True)
    guard = Bool(
        True,
        help="Before a plain cell that loads a model into a name, release the model that name holds (and its hidden copies).",
    ).tag(config=True)
    oom_rescue = Bool(
        True,
        help="After a cell fails with an out-of-memory error: free what only its traceback's frames hold, and explain.",
    ).tag(config=True)

    def __init__(self, shell=None, **kwargs):
        from llm_magic.ipython.shell_state import require_shell

        require_shell(shell)
        super().__init__(shell=shell, **kwargs)
        from llm_magic.ipython.hooks import Guard, OOMRescue, Watcher

        self.oom = OOMRescue(shell, enabled=lambda: self.oom_rescue)
        self.watcher = Watcher(shell)
        self.guard_hooks = Guard(shell, enabled=lambda: self.guard, watching=lambda: self.watcher.active)

    @magic_arguments()
    @argument("model_name", nargs="?", help="Model id or local path; bound as MODEL_NAME for the body.")
    @argument("--model-var", default="model", help="Empty body: the variable for the model (default: model).")
    @argument("--tokenizer-var", default="tokenizer", help="Empty body: the variable for the tokenizer (default: tokenizer).")
    @argument("--no-tokenizer", action="store_true", help="Empty body: load no tokenizer.")
    @argument("--dtype", default=DTYPE_CHOICES[0], help=f"Empty body: dtype ({', '.join(DTYPE_CHOICES)}; default: {DTYPE_CHOICES[0]}).")
    @argument(
        "--device-map",
        default=DEVICE_MAP_CHOICES[0],
        help=f"Empty body: device_map ({', '.join(DEVICE_MAP_CHOICES)}; default: {DEVICE_MAP_CHOICES[0]}).",
    )
    @argument("--trust-remote-code", action="store_true", help="Empty body: pass trust_remote_code=True (off unless given).")
    @argument("--release-all", action="store_true", help="Also release every other object in the namespace that holds tensors.")
    @argument("--dry-run", action="store_true", help="Predict placement (and what would be released); release and load nothing.")
    @argument("--strict", action="store_true", help="Refuse, before reading weights, a load predicted to use a slower tier (cpu/disk).")
    @argument("--batch", type=int, default=1, help="Batch size for the generation-headroom figure (default: 1).")
    @argument("-o", "--output", action="store_true", help="Return the report object.")
    @line_cell_magic
    def llmload(self, line: str, cell: str | None = None):
        """Release what the cell replaces (and its hidden copies), load, report placement.

        %%llmload MODEL_NAME [options]
        model = AutoModelForCausalLM.from_pretrained(MODEL_NAME, device_map="auto")

        With no body (`%llmload MODEL_NAME`), loads `tokenizer` and `model` itself.
        """
        __tracebackhide__ = True  # noqa: F841 - IPython hides this frame in tracebacks
        from dataclasses import replace

        from llm_magic.cell.body import CellSyntaxError
        from llm_magic.commands.llmload import LoadOptions, run_llmload
        from llm_magic.render.core import show
        from llm_magic.render.load import render_load_report

        magic = "%llmload" if cell is None else "%%llmload"  # as typed: the line or the cell form
        args = parse_argstring(self.llmload, line)
        if not args.model_name:
            raise UsageError(f"{magic} needs a MODEL_NAME (a model id or a local path)")
        options = LoadOptions(
            model_name=args.model_name.strip("'\""),
            model_var=args.model_var,
            tokenizer_var=None if args.no_tokenizer else args.tokenizer_var,
            dtype=args.dtype,
            device_map=args.device_map,
            trust_remote_code=args.trust_remote_code,
            release_all=args.release_all,
            dry_run=args.dry_run,
            strict=args.strict or self.strict,
            batch=args.batch,
        )
        if options.batch < 1:
            raise UsageError("--batch must be at least 1")
        try:
            outcome = run_llmload(self.shell, options, cell)
        except (CellSyntaxError, ValueError) as error:
            raise UsageError(str(error)) from None
        report = replace(outcome.report, magic=magic)
        show(render_load_report(report))
        if outcome.error is not None:
            raise outcome.error
        return report if args.output else outcome.value

    @magic_arguments()
    @argument("names", nargs="*", help="Objects to release: NAME, NAME.attr or NAME['key'].")
    @argument("--all", action="store_true", dest="everything", help="Release every object that holds tensors, hidden copies too.")
    @argument("--hidden", action="store_true", help="Release only hidden copies (Out, _, the last traceback) and what only they hold.")
    @argument("--dry-run", action="store_true", help="Show what would be released; change nothing.")
    @argument("-o", "--output", action="store_true", help="Return the release result object.")
    @line_magic
    def llmfree(self, line: str):
        """Release objects and every hidden copy of them; print what was freed per device."""
        from llm_magic.commands.llmfree import FreeError, run_llmfree
        from llm_magic.render.core import show
        from llm_magic.render.release import render_release

        # Names are split by hand: `d['my model']` is one name (shell-style splitting cuts it).
        args = self.llmfree.parser.parse_args(split_names(line))
        try:
            result = run_llmfree(self.shell, args.names, everything=args.everything, hidden_only=args.hidden, dry_run=args.dry_run)
        except FreeError as error:
            raise UsageError(str(error)) from None
        show(render_release(result, f"%llmfree {line.strip()}"))
        if result.interrupted:
            raise KeyboardInterrupt
        return result if args.output else None

    @magic_arguments()
    @argument("--all", action="store_true", dest="include_small", help="Include small holders too.")
    @argument("--deep", action="store_true", help="Walk every name to the end, and search unnamed holders through gc (slower on big heaps).")
    @argument("--json", action="store_true", help="Print the snapshot as JSON (the same numbers).")
    @argument("-o", "--output", action="store_true", help="Return the snapshot object.")
    @line_magic
    def gpustate(self, line: str):
        """Where accelerator and CPU memory is, and which notebook objects hold it."""
        import json

        from llm_magic.commands.gpustate import take_snapshot
        from llm_magic.ipython import shell_state
        from llm_magic.render.core import show
        from llm_magic.render.gpustate import render_gpustate

        args = parse_argstring(self.gpustate, line)
        state = take_snapshot(
            shell_state.visible_names(self.shell),
            shell_state.hidden_refs(self.shell),
            deep=args.deep,
            small_bytes=0 if args.include_small else self.small_holder_bytes,
        )
        if args.json:
            print(json.dumps(state.to_dict(), ensure_ascii=False, indent=1))
        else:
            show(render_gpustate(state))
        return state if args.output else None

    @magic_arguments()
    @argument("model_var", help="The model in the namespace (a name, NAME.attr or NAME['key']; a pipeline's .model).")
    @argument("--prompts", default=None, help="An expression: a list of strings or token-id lists, a datasets column, a pandas Series.")
    @argument("--tokens", type=int, nargs="+", default=None, help="Bare prompt lengths, one item each.")
    @argument("--tokenizer", default="tokenizer", help="The tokenizer variable for text prompts (default: tokenizer).")
    @argument("--chat", action="store_true", help="Count each text prompt through the tokenizer's chat template.")
    @argument("--max-new-tokens", type=int, default=256, help="New tokens per generate call (default: 256).")
    @argument("--batch", type=int, default=1, help="Prompts per generate call, in order, padded to the longest (default: 1).")
    @argument("--budget", default=None, help="Memory to check against instead of what is free: cuda:0=15GiB,cpu=12GiB.")
    @argument("--json", action="store_true", help="Print the result as JSON (the same numbers).")
    @argument("-o", "--output", action="store_true", help="Return the result object.")
    @line_magic
    def llmfit(self, line: str):
        """Will a generation loop survive? The peak memory of each generate call, per device, and
        the first input that will run out, predicted on fake tensors (no real memory used)."""
        import json

        from llm_magic.commands.llmfit import FitError, FitOptions, run_llmfit
        from llm_magic.render.core import show
        from llm_magic.render.fit import render_fit

        args = parse_argstring(self.llmfit, line)
        options = FitOptions(
            model_var=args.model_var,
            prompts=args.prompts.strip("'\"") if args.prompts else None,
            tokens=tuple(args.tokens) if args.tokens else None,
            tokenizer_var=args.tokenizer,
            chat=args.chat,
            max_new_tokens=args.max_new_tokens,
            batch=args.batch,
            budget=args.budget,
        )
        try:
            report = run_llmfit(self.shell, options)
        except FitError as error:
            raise UsageError(str(error)) from None
        if args.json:
            print(json.dumps(report.to_dict(), ensure_ascii=False, indent=1))
        else:
            show(render_fit(report))
        return report if args.output else None

    @line_magic
    def llmwatch(self, line: str):
        """%llmwatch on|off: after each cell, a line when a model is (re)bound or moved, and a
        warning (once) when accelerator memory is held only by hidden or unnamed copies."""
        choice = line.strip().lower()
        if choice == "on":
            self.watcher.start()
        elif choice == "off":
            self.watcher.stop()
        elif choice:
            raise UsageError("%llmwatch on|off")
        print(f"%llmwatch is {'on' if self.watcher.active else 'off'}")

    @line_magic
    def llmguard(self, line: str):
        """%llmguard on|off: before a plain cell that loads a model into a name (`model =
        AutoModelForCausalLM.from_pretrained(...)`), release the model that name holds and its
        hidden copies, by the rules of %%llmload. On by default; also `%config LLMMagic.guard`."""
        choice = line.strip().lower()
        if choice in ("on", "off"):
            self.guard = choice == "on"
        elif choice:
            raise UsageError("%llmguard on|off")
        print(f"%llmguard is {'on' if self.guard else 'off'}")
