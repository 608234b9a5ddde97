"""Hydra's own composition errors as clcli's one-paragraph errors (exit 2; README "Resume,
validation, failures"): an unknown option of a config group (``method=slcaa``), an unknown key
(``optim.lrr=3``), a malformed override (``method:slca``), ``+`` on a group the defaults list
already selects (``+experiment=...``). Each names the override, says what was expected and how to
fix it, with the closest option or key (:func:`clcli.config.closest`, as ``clcli validate``'s
unknown-key check does).
"""
from __future__ import annotations

import re
from pathlib import Path

from clcli.errors import ClcliError, ConfigError

GRAMMAR = ("Overrides are key=value (change a key), +key=value (add a key), ~key (remove one) and group=option "
           "(choose a preset); quote a value with spaces or special characters, e.g. 'key=\"a b\"' "
           "(https://hydra.cc/docs/advanced/override_grammar/basic/).")
MAX_LISTED = 12


def user_config_dirs(argv: list[str]) -> list[Path]:
    """The config dirs a command line adds to Hydra's search path: ``--config-dir DIR`` / ``-cd DIR``
    and ``hydra.searchpath=[file://DIR,...]``."""
    dirs: list[str] = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(argv[i + 1])
        elif arg.startswith("--config-dir="):
            dirs.append(arg.split("=", 1)[1])
        elif re.match(r"^\+*hydra\.searchpath=", arg):
            value = arg.split("=", 1)[1].strip("[]")
            dirs += [d.strip().strip("'\"") for d in value.split(",") if d.strip()]
    return [Path(re.sub(r"^file://", "", d)) for d in dirs if not d.startswith("pkg://")]


def _suggestion(word: str, candidates, prefix: str = "") -> str:
    from clcli.config import closest

    match = closest(word, candidates)
    return f" Did you mean {prefix}{match}?" if match else ""


def _listing(names: list[str], group: str) -> str:
    if len(names) > MAX_LISTED:
        return f"It has {len(names)} options (`clcli ls {group}` lists them with what each is)"
    return f"Options: {', '.join(names)} (`clcli ls {group}` says what each is)"


def _missing_option(exc, argv: list[str]) -> str:
    """``group=option`` names no file: the group's options (recursive: ``experiment=slca/...``)."""
    from clcli import presets

    missing = str(getattr(exc, "missing_cfg_file", None) or "")
    where = re.search(r"In '([^']+)'", str(exc))
    if not missing or "/" not in missing:
        return f"{str(exc).splitlines()[0]}."
    cat = presets.catalog(presets.config_dirs(user_config_dirs(argv)))
    groups = [g for g in cat if missing.startswith(g + "/")]
    group = max(groups, key=len) if groups else missing.rsplit("/", 1)[0]
    option = missing[len(group) + 1:]
    names = sorted({o.name for o in cat.get(group, [])})
    inside = Path(missing).parent.as_posix()[len(group) + 1:]
    names = sorted(set(names) | {f"{inside}/{o}" if inside else o for o in (getattr(exc, "options", None) or [])})
    origin = f" (asked for by the defaults list of {where.group(1)}.yaml)" if where and where.group(1) != "config" else ""
    if not names:
        return (f"{group}={option}: no config group '{group}'{origin}. `clcli ls` lists the groups and their "
                "options.")
    return (f"{group}={option}: no option '{option}' in config group '{group}'{origin}."
            f"{_suggestion(option, names, f'{group}=')} {_listing(names, group)}. Your own "
            f"presets go in DIR/{group}/NAME.yaml with --config-dir DIR.")


def _parse_error(exc) -> str:
    """An override the grammar refuses: Hydra's reason, and the likely intended form."""
    from clcli import presets

    override = str(getattr(exc, "override", "") or "")
    lines = [ln for ln in str(getattr(exc, "message", exc)).splitlines()
             if ln.strip() and not ln.startswith(("Error parsing override", "See https"))]
    reason = "; ".join(lines) or "not an override"
    hint = ""
    if "=" not in override:
        if ":" in override:
            hint = f" Did you mean {override.replace(':', '=', 1)}?"
        else:
            groups = presets.catalog(presets.config_dirs())
            word = override.lstrip("+~")
            if word in groups:
                hint = f" A group needs an option: {word}=NAME (`clcli ls {word}`)."
            elif (match := _suggestion(word, groups)):
                hint = f"{match[:-1]}=NAME?"
    return f"cannot parse the override '{override}' ({reason}).{hint} {GRAMMAR}"


def _known_keys(full_key: str, parent_keys: list[str]) -> set[str]:
    """Names that may follow ``full_key``'s parent: the node's keys, and for ``optim`` the keys the
    optimizer code reads (``clcli.optim.OPTIM_KEYS``) even where no preset sets them."""
    known = {k for k in parent_keys if k != "hydra"}
    parent = full_key.rpartition(".")[0]
    if parent == "optim" or parent.startswith("optim."):
        from clcli.optim import OPTIM_KEYS

        rel = parent[len("optim"):].lstrip(".")
        depth = len(rel.split(".")) if rel else 0
        for path in OPTIM_KEYS:
            parts = path.split(".")
            if ".".join(parts[:depth]) == rel and len(parts) > depth:
                known.add(parts[depth])
    return known


def _unknown_key(exc, cause) -> str:
    """``key=value`` on a key the composed config lacks: the closest key of the same node."""
    full_key = str(cause.full_key)
    parent, _, name = full_key.rpartition(".")
    node = getattr(cause, "parent_node", None)
    keys = sorted(_known_keys(full_key, list(node.keys()) if node is not None else []))
    add = re.search(r"use (\+\S+)", str(exc))
    addition = add.group(1) if add else f"+{full_key}=VALUE"
    if name in keys:  # read by the code, but no chosen preset sets it (e.g. milestones for a cosine schedule)
        return (f"{full_key}: not set by the chosen presets, so it cannot be changed; add it with {addition} "
                "(clcli then checks that the chosen options read it).")
    target = node.get("_target_") if node is not None and "_target_" in node else None
    if isinstance(target, str):  # a key the component's class lists as replaced (its `moved_keys`)
        from clcli.config import _moved_keys

        if moved := _moved_keys(target).get(name):
            return f"{full_key}: replaced by {moved}; set {moved}=VALUE instead (remove {full_key})."
    return (f"{full_key}: no such key in the configuration.{_suggestion(name, keys, parent + '.' if parent else '')} "
            f"{parent or 'The top level'} has: {', '.join(keys)}. Fix the name; a new key is added with {addition} "
            "(clcli then refuses it unless some code reads it).")


def _composition(exc, argv: list[str]) -> str:
    msg = str(exc)
    cause = exc.__cause__
    if cause is not None and getattr(cause, "full_key", None) and msg.startswith("Could not override"):
        return _unknown_key(exc, cause)
    m = re.match(r"Multiple values for (\S+?)\.", msg) or re.match(r"(\S+) appears more than once in the final defaults", msg)
    if m:
        group = m.group(1)
        given = next((a for a in argv if a.startswith(f"+{group}=")), f"+{group}=NAME")
        return (f"{given}: the defaults list already has an entry for '{group}', so '+' would add a second one. Drop the "
                f"'+': {given[1:]}.")
    m = re.match(r"Could not override '([^']+)'\. No match in the defaults list", msg)
    if m:
        group = m.group(1)
        given = next((a for a in argv if a.startswith(f"{group}=")), f"{group}=NAME")
        return (f"{given}: the config group '{group}' is not in the defaults list, so there is no choice to change. "
                f"Add it with a '+': +{given}.")
    m = re.match(r"Could not delete from config\. '([^']+)' does not exist", msg)
    if m:
        return f"~{m.group(1)}: no such key to remove. `clcli train --cfg job <overrides>` prints the keys."
    return _generic(exc)


def _generic(exc) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = " ".join(lines[:3]) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        detail += f" ({str(cause).splitlines()[0]})"
    return (f"the configuration cannot be composed: {detail.rstrip('.')}. Check the overrides against "
            "`clcli ls` and `clcli train --cfg job`.")


def translate(exc: BaseException, argv: list[str]) -> ClcliError | None:
    """The clcli error for an exception out of Hydra's composition (``argv``: the command line given
    to Hydra), or ``None`` when it is not a configuration error (a bug keeps its traceback)."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    err: BaseException | None = exc
    while err is not None:  # a clcli error raised inside Hydra: itself
        if isinstance(err, ClcliError):
            return err
        err = err.__cause__
    if isinstance(exc, MissingConfigException):
        return ConfigError([_missing_option(exc, argv)])
    if isinstance(exc, OverrideParseException):
        return ConfigError([_parse_error(exc)])
    if isinstance(exc, ConfigCompositionException):
        return ConfigError([_composition(exc, argv)])
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return ConfigError([_generic(exc)])
    return None
