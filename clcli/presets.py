"""Config presets on disk: the config groups of ``conf/`` (and of user config dirs given with
``--config-dir``), each option with its file's first comment line (``clcli ls``), and copying one out
for editing (``clcli cp``). README "Presets: list, copy, your own" shows the round trip.

What is a group follows how the configs are used, not only the folders: a top-level folder is a
group (``data``, ``experiment``, ``sweep``, any new one); a folder below it is a group of its own
only when the configs beside it select from it in their defaults list (``optim/optimizer``: the
``optim`` options say ``- optimizer: sgd``); otherwise its files are options of the group above,
named with their path (``experiment=slca/slca_cifar100_in21k``).
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from clcli.errors import ClcliError


@dataclass(frozen=True)
class Option:
    group: str   # data, optim/optimizer, experiment
    name: str    # split_cifar100, slca/slca_cifar100_in21k
    path: Path
    root: Path   # the config dir it comes from

    @property
    def spec(self) -> str:
        """``group/name``: what ``clcli cp`` takes."""
        return f"{self.group}/{self.name}"


def describe(path: Path) -> str:
    """The first comment line of a yaml file (after any ``# @package`` line): what it is."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text:
            continue
        if not text.startswith("#"):
            return ""
        if not text.startswith("# @package"):
            return text.lstrip("#").strip()
    return ""


def _subdirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _default_keys(path: Path) -> list[str]:
    """The group keys of a config's defaults list (``override x``, ``optional x``, ``x@pkg`` -> ``x``)."""
    try:
        defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults") or []
    except Exception:  # noqa: BLE001 - not a mapping or not yaml: it selects nothing
        return []
    keys = []
    for entry in defaults:
        if isinstance(entry, dict) and entry:
            keys.append(next(iter(entry)).split()[-1].split("@")[0])
    return keys


def _nested_groups(roots: list[Path]) -> set[str]:
    """``parent/child`` folders that the configs directly in ``parent`` select in their defaults."""
    nested = set()
    for root in roots:
        for d in [p for p in root.rglob("*") if p.is_dir()]:
            subs = {s.name for s in _subdirs(d)}
            if not subs:
                continue
            rel = d.relative_to(root).as_posix()
            for f in d.glob("*.yaml"):
                for key in _default_keys(f):
                    name = key[len(f"/{rel}/"):] if key.startswith(f"/{rel}/") else key
                    if name in subs:
                        nested.add(f"{rel}/{name}")
    return nested


def _collect(d: Path, group: str, prefix: str, root: Path, nested: set[str]):
    for f in sorted(d.glob("*.yaml")):
        yield Option(group, prefix + f.stem, f, root)
    for sub in _subdirs(d):
        if not prefix and f"{group}/{sub.name}" in nested:
            yield from _collect(sub, f"{group}/{sub.name}", "", root, nested)
        else:
            yield from _collect(sub, group, f"{prefix}{sub.name}/", root, nested)


def config_dirs(extra: list[str | Path] | None = None) -> list[Path]:
    """The shipped config dir, then the user's (``--config-dir``)."""
    from clcli.cli import _config_dir

    return [Path(_config_dir()), *(Path(d) for d in extra or [])]


def catalog(roots: list[Path]) -> dict[str, list[Option]]:
    """Per group (sorted), its options from every root (sorted by name, then root order)."""
    roots = [r for r in roots if r.is_dir()]
    nested = _nested_groups(roots)
    groups: dict[str, list[Option]] = {}
    for root in roots:
        for top in _subdirs(root):
            for opt in _collect(top, top.name, "", root, nested):
                groups.setdefault(opt.group, []).append(opt)
    return {g: sorted(groups[g], key=lambda o: o.name) for g in sorted(groups)}


def usage(group: str, primary: Path) -> str:
    """How a command line selects an option: ``group=NAME``, or ``+group=NAME`` for a top-level group
    the primary config's defaults list does not name (``sweep``)."""
    in_defaults = set(_default_keys(primary))
    return f"{group}=NAME" if "/" in group or group in in_defaults else f"+{group}=NAME"


def _suggest(word: str, candidates) -> str:
    from clcli.config import closest

    match = closest(word, candidates)
    return f" Did you mean {match}?" if match else ""


def select(cat: dict[str, list[Option]], what: str | None) -> dict[str, list[Option]]:
    """The groups to list: all, one group, or the options of a group under a path
    (``experiment/slca``)."""
    if not what:
        return cat
    what = what.strip("/")
    if what in cat:
        return {what: cat[what]}
    for group, opts in cat.items():
        if what.startswith(group + "/"):
            under = [o for o in opts if o.spec.startswith(what + "/")]
            if under:
                return {group: under}
    raise ClcliError(f"clcli ls {what}: no config group or folder '{what}'.{_suggest(what, cat)} Groups: "
                     f"{', '.join(cat)}. Run `clcli ls` to see every group with its options.")


def render(cat: dict[str, list[Option]], primary: Path, width: int | None = None) -> str:
    """One header per group (how to select an option) and one line per option with its description;
    options from a user config dir name it. ``width``: cut lines to it (a terminal)."""
    shipped = primary.parent
    out = []
    for group, opts in cat.items():
        out.append(f"{group}  ({usage(group, primary)})")
        pad = max(len(o.name) for o in opts)
        names = {o.name for o in opts if o.root == shipped}
        for o in opts:
            where = "" if o.root == shipped else f"  [{o.root}" + (
                "; unused: a shipped preset has this name, rename it]" if o.name in names else "]")
            line = f"  {o.name:<{pad}}  {describe(o.path)}{where}"
            out.append(line if width is None or len(line) <= width else line[: width - 1] + "…")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def find(cat: dict[str, list[Option]], spec: str) -> Option:
    """The option ``group/name`` (``.yaml`` optional); the shipped one when a user config dir has the
    same name (Hydra's search path puts the shipped dir first, so it is the one a run uses)."""
    spec = spec.strip("/").removesuffix(".yaml")
    found = [o for opts in cat.values() for o in opts if o.spec == spec]
    if found:
        return found[0]
    specs = [o.spec for opts in cat.values() for o in opts]
    raise ClcliError(f"clcli cp {spec}: no preset '{spec}'.{_suggest(spec, specs)} A preset is named "
                     "<group>/<option> as `clcli ls` lists it, e.g. experiment/slca/slca_cifar100_in21k.")


def _hint(dest: Path, group: str, taken: set[str], primary: Path) -> str:
    """How to use a copied preset: from its place under ``<dir>/<group>/`` if it is in one (and
    under a name no shipped preset of the group has: those come first on Hydra's search path)."""
    parts = group.split("/")
    absolute = dest.resolve()
    folders = absolute.parent.parts
    for i in range(len(folders) - len(parts), 0, -1):
        if list(folders[i: i + len(parts)]) == parts:
            config_dir = Path(*folders[:i])
            name = absolute.relative_to(config_dir / group).with_suffix("").as_posix()
            if name in taken:
                return (f"Rename it before use: the shipped {group}={name} comes first on Hydra's search path, "
                        "so a run would not see your edits.")
            return f"Use it: clcli train --config-dir {config_dir} {usage(group, primary).replace('NAME', name)}"
    return (f"To use it, place it at DIR/{group}/NAME.yaml (a new NAME) and run: clcli train --config-dir DIR "
            f"{usage(group, primary)} (or hydra.searchpath=[file://DIR]).")


def copy(option: Option, dest: Path) -> Path:
    """Copy the preset's file to ``dest`` (into it, if a folder), creating folders; refuses an
    existing file (exclusive create: nothing is overwritten, even by a race)."""
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / option.path.name
    if dest.exists():
        raise ClcliError(f"clcli cp: '{dest}' already exists; nothing was copied or overwritten. Choose another "
                         "file name, or remove the old file first.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with option.path.open("rb") as src, dest.open("xb") as out:
            shutil.copyfileobj(src, out)
    except FileExistsError as exc:
        raise ClcliError(f"clcli cp: '{dest}' already exists; nothing was overwritten.") from exc
    return dest


def main(command: str, argv: list[str]) -> None:
    """``clcli ls [GROUP] [--config-dir DIR]`` and ``clcli cp GROUP/OPTION FILE [--config-dir DIR]``."""
    import argparse

    p = argparse.ArgumentParser(prog=f"clcli {command}")
    if command == "ls":
        p.add_argument("group", nargs="?", help="a group (data, experiment, optim/optimizer, ...) or a folder of one")
    else:
        p.add_argument("preset", help="GROUP/OPTION as `clcli ls` lists it, e.g. experiment/slca/slca_cifar100_in21k")
        p.add_argument("dest", help="the new file (or a folder to copy into); never overwritten")
    p.add_argument("--config-dir", action="append", default=[], metavar="DIR",
                   help="also your presets in DIR/<group>/*.yaml (as for `clcli train --config-dir DIR`)")
    args = p.parse_args(argv)
    roots = config_dirs(args.config_dir)
    cat = catalog(roots)
    if command == "ls":
        width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
        sys.stdout.write(render(select(cat, args.group), roots[0] / "config.yaml", width))
        return
    option = find(cat, args.preset)
    dest = copy(option, Path(args.dest))
    taken = {o.name for o in cat[option.group] if o.root == roots[0]}
    print(f"copied {option.path} to {dest}. {_hint(dest, option.group, taken, roots[0] / 'config.yaml')}")
