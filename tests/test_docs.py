"""The documentation cannot drift from the repository: every link and picture in README.md,
CONTRIBUTING.md and docs/ exists, every `+experiment=` recipe they name composes (and every
recipe in conf/experiment/ is named), and docs/configuration.md lists exactly the keys, with
their defaults, of each primary config. No MindSpore, no training: a unit test."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from xray import CONF_DIR

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = Path(CONF_DIR) / "experiment"
CONFIGURATION = ROOT / "docs" / "configuration.md"

# pages other people write: linked only if present
OPTIONAL_PAGES = {ROOT / "docs" / "export.md"}

# primary config -> which of `config`'s keys it shares and so does not list again:
# a group prefix ("data.") or "" (all of them: bench is the training config plus its own keys)
SHARED_WITH_CONFIG = {"config": (), "convert": ("data.", "cluster."), "evaluate": ("cluster.",),
                      "predict": (), "bench": ("",), "lr_find": ("",)}

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) and ![alt](target)
HTML_IMAGE = re.compile(r"<img[^>]*\ssrc=\"([^\"]+)\"")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
RECIPE = re.compile(r"\+experiment=([\w./-]+)")


def doc_files() -> list[Path]:
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [p for p in pages if p.is_file()]


def prose(path: Path) -> str:
    """The page without its code blocks (a link-like string in code is not a link)."""
    return FENCE.sub("", path.read_text())


def local_targets(path: Path) -> list[str]:
    text = prose(path)
    targets = LINK.findall(text) + HTML_IMAGE.findall(text)
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


def test_the_pages_exist():
    for path in [ROOT / "README.md", ROOT / "CONTRIBUTING.md"] + [ROOT / "docs" / p for p in (
            "usage.md", "configuration.md", "cluster.md", "speed-and-gpus.md", "testing.md", "design.md")]:
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"


def test_every_relative_link_and_image_exists():
    dead = []
    for page in doc_files():
        for target in local_targets(page):
            file = (page.parent / target.split("#", 1)[0]).resolve()
            if not file.exists() and file not in OPTIONAL_PAGES:
                dead.append(f"{page.relative_to(ROOT)}: {target}")
    assert not dead, "dead links: " + ", ".join(dead)


def named_recipes() -> dict[str, Path]:
    named = {}
    for page in doc_files():
        for name in RECIPE.findall(page.read_text()):
            named.setdefault(name.rstrip("."), page)
    return named


def test_the_docs_name_recipes():
    assert named_recipes(), "no +experiment= recipe is named in the docs"


@pytest.mark.parametrize("name", sorted(named_recipes()))
def test_every_named_recipe_composes(name):
    page = named_recipes()[name]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            compose("config", overrides=[f"+experiment={name}"])
        except Exception as e:  # noqa: BLE001 - which recipe, on which page
            pytest.fail(f"{page.relative_to(ROOT)}: +experiment={name} does not compose: {e}")


def test_every_recipe_is_named_in_the_docs():
    recipes = {str(p.relative_to(EXPERIMENTS).with_suffix("")) for p in EXPERIMENTS.rglob("*.yaml")}
    missing = sorted(recipes - set(named_recipes()))
    assert not missing, f"recipes in conf/experiment/ that no page names as +experiment=...: {missing}"


# ---------------------------------------------------------------------------- configuration.md

def leaves(node: dict, prefix: str = "") -> dict:
    """Dotted leaf key -> value; an empty dict is a leaf."""
    out = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def shown(value) -> str:
    """A default as the reference writes it (YAML flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {shown(v)}" for k, v in value.items()) + "}"
    if value == "":
        return '""'
    return str(value)


def composed_keys(name: str) -> dict:
    if name == "bench":
        import xray.bench  # noqa: F401 - stores the bench config in Hydra's ConfigStore
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(name)
    return leaves(OmegaConf.to_container(cfg, resolve=False))


def documented(text: str) -> dict[str, dict[str, str]]:
    """{config name: {dotted key: default}} from the tables under the `## `name`` headings."""
    tables: dict[str, dict[str, str]] = {}
    current = None
    for line in text.splitlines():
        heading = re.match(r"^## `(\w+)`", line)
        if heading:
            current = tables.setdefault(heading.group(1), {})
        elif line.startswith("#"):
            current = None
        elif current is not None and line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            key = cells[0].strip("`")
            assert key not in current, f"{key} is documented twice"
            current[key] = cells[1][1:-1].replace("\\|", "|") if cells[1].startswith("`") else cells[1]
    return tables


def expected(name: str, config_keys: dict) -> dict:
    keys = composed_keys(name)
    shared = SHARED_WITH_CONFIG[name]
    return {k: v for k, v in keys.items()
            if not (k in config_keys and any(k.startswith(p) for p in shared))}


def test_every_primary_config_is_documented():
    tables = documented(CONFIGURATION.read_text())
    primary = {p.stem for p in Path(CONF_DIR).glob("*.yaml")} | {"bench"}
    assert primary <= set(SHARED_WITH_CONFIG), \
        f"a new primary config: add it to SHARED_WITH_CONFIG here and to docs/configuration.md: {primary}"
    assert set(tables) == primary, f"docs/configuration.md documents {sorted(tables)}, conf/ has {sorted(primary)}"


@pytest.mark.parametrize("name", sorted(SHARED_WITH_CONFIG))
def test_the_configuration_reference_matches_the_config(name):
    tables = documented(CONFIGURATION.read_text())
    keys = expected(name, composed_keys("config"))
    rows = tables.get(name, {})
    missing, extra = sorted(set(keys) - set(rows)), sorted(set(rows) - set(keys))
    assert not missing, f"docs/configuration.md, `{name}`: keys without a row: {missing}"
    assert not extra, f"docs/configuration.md, `{name}`: rows that are no key of the config: {extra}"
    wrong = {k: (rows[k], shown(v)) for k, v in keys.items() if rows[k] != shown(v)}
    assert not wrong, f"docs/configuration.md, `{name}`: documented default vs the config's: {wrong}"
