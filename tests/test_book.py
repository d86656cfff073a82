"""The book: templates, profiles, the golden notebook, the smoke build, and a real browser.

Slow parts (each runs notebooks in a kernel): every template under ``pytest --nbval-lax`` with
its smoke parameters; the golden quickstart under strict ``nbval``; the smoke book built as
``make book`` builds it (``eandc book``: papermill, then ``jupyter-book build -W -n
--keep-going``), then opened in headless Chromium.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest
import yaml

from eandc import book

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = sorted((ROOT / "notebooks").glob("*.ipynb"))
GOLDEN = ROOT / book.GOLDEN
SANITIZE = GOLDEN.parent / "sanitize.cfg"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _pytest(*args, cwd=ROOT, timeout=900):
    env = dict(os.environ, TQDM_DISABLE="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _toc_files() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]
    for part in toc["parts"]:
        files += [chapter["file"] for chapter in part["chapters"]]
    return files


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code" and
            "injected-parameters" not in c.metadata.get("tags", [])]


# ---------------------------------------------------------------------------------------------
# Templates and profiles (fast).

def test_there_are_templates_and_the_book_config_is_as_the_issue_asks():
    assert {p.stem for p in TEMPLATES} >= {"quickstart", "symmetries"}
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True
    assert "intersphinx_mapping" not in json.dumps(config)
    assert yaml.safe_load((ROOT / "_toc.yml").read_text())["format"] == "jb-book"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.stem)
def test_template_has_one_parameters_cell_with_profile_and_seeds_and_no_outputs(template):
    nb = nbformat.read(template, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    names = re.findall(r"^(\w+)\s*=", tagged[0].source, flags=re.M)
    assert names[0] == "profile" and 'profile = "standard"' in tagged[0].source
    assert any("seed" in name for name in names)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "templates store no outputs"
    assert nb.metadata["kernelspec"]["name"] == book.KERNEL
    figures = [c for c in nb.cells if c.cell_type == "code" and "plt.subplots" in c.source]
    assert figures and all(c.source.rstrip().endswith("plt.show()") for c in figures)


@pytest.mark.parametrize("profile", book.PROFILES)
def test_every_profile_runs_every_template_and_produces_every_page_of_the_toc(profile):
    runs = book.load_profile(profile, ROOT)
    assert {r.notebook for r in runs} == {p.stem for p in TEMPLATES}
    produced = {f"{book.EXECUTED}/{r.name}" for r in runs}
    wanted = {f for f in _toc_files() if f.startswith(book.EXECUTED)}
    assert wanted <= produced
    for run in runs:
        assert run.parameters["profile"] == profile
        defaults = "\n".join(_code(nbformat.read(run.template(ROOT), as_version=4)))
        for name in run.parameters:  # every override names a parameter of the template
            assert re.search(rf"^{name}\s*=", defaults, flags=re.M), (run.notebook, name)


def test_a_profile_that_misses_a_template_is_refused(tmp_path):
    (tmp_path / "notebooks" / "profiles").mkdir(parents=True)
    shutil.copy(TEMPLATES[0], tmp_path / "notebooks")
    (tmp_path / "notebooks" / "profiles" / "smoke.toml").write_text('[[nothing]]\nname = "x"\n')
    with pytest.raises(book.BookError, match="no template for nothing"):
        book.load_profile("smoke", tmp_path)
    (tmp_path / "notebooks" / "profiles" / "smoke.toml").write_text("")
    with pytest.raises(book.BookError, match="no parameter set"):
        book.load_profile("smoke", tmp_path)
    with pytest.raises(book.BookError, match="no profile"):
        book.load_profile("nope", tmp_path)


def test_the_kernel_is_this_environment(tmp_path):
    from jupyter_client.kernelspec import KernelSpecManager

    assert book.ensure_kernel() == book.KERNEL
    argv = KernelSpecManager().get_kernel_spec(book.KERNEL).argv
    assert os.path.abspath(argv[0]) == os.path.abspath(sys.executable)


def test_eandc_book_outside_a_book_fails_with_a_reason(tmp_path, capsys):
    from eandc.cli import main

    assert main(["book", "--profile", "smoke", "--root", str(tmp_path)]) == 1
    assert "has no _config.yml" in capsys.readouterr().err


def test_fingerprint_changes_with_parameters_and_template(tmp_path):
    (tmp_path / "notebooks").mkdir()
    shutil.copy(TEMPLATES[0], tmp_path / "notebooks" / "t.ipynb")
    a, b = book.Run("t", "t", {"x": 1}), book.Run("t", "t", {"x": 2})
    key = book.fingerprint(a, tmp_path)
    assert key == book.fingerprint(a, tmp_path) != book.fingerprint(b, tmp_path)
    (tmp_path / "notebooks" / "t.ipynb").write_text("{}")
    assert book.fingerprint(a, tmp_path) != key


# ---------------------------------------------------------------------------------------------
# Templates run top to bottom with their smoke parameters (pytest --nbval-lax).

def test_every_template_runs_under_nbval_lax_with_smoke_parameters(tmp_path):
    import papermill

    for run in book.load_profile("smoke", ROOT):
        papermill.execute_notebook(str(run.template(ROOT)), str(tmp_path / f"{run.notebook}.ipynb"),
                                   parameters=run.parameters, prepare_only=True,
                                   kernel_name=book.KERNEL, progress_bar=False)
    proc = _pytest("--nbval-lax", "--nbval-current-env", "--rootdir", str(tmp_path), str(tmp_path),
                   cwd=ROOT / "notebooks")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    counts = re.search(r"(\d+) passed", proc.stdout)
    n_cells = sum(len(_code(nbformat.read(t, as_version=4))) for t in TEMPLATES)
    assert counts and int(counts.group(1)) >= n_cells


# ---------------------------------------------------------------------------------------------
# The golden notebook: committed with outputs, compared by strict nbval.

def test_golden_notebook_is_the_smoke_quickstart_and_records_an_exact_recovery():
    golden = nbformat.read(GOLDEN, as_version=4)
    template = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    assert _code(golden) == _code(template), "the template changed: run `make golden`"
    smoke = next(r for r in book.load_profile("smoke", ROOT) if r.notebook == "quickstart")
    assert golden.metadata["papermill"]["parameters"] == smoke.parameters
    text = "".join(o.get("text", "") for c in golden.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")
    teacher = re.search(r"teacher widths:\s+(\[[\d, ]+\])", text).group(1)
    recovered = re.search(r"recovered widths:\s+(\[[\d, ]+\])", text).group(1)
    assert teacher == recovered == str([smoke.parameters["teacher_width"]])
    assert "exact recovery:   True" in text


def test_golden_notebook_reproduces_under_strict_nbval():
    proc = _pytest("--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE),
                   str(GOLDEN))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert re.search(r"\d+ passed", proc.stdout) and "failed" not in proc.stdout


def test_sanitize_rules_keep_widths_and_booleans_but_not_float_digits(tmp_path):
    """The sanitize file must not hide the key outputs: a changed width or verdict fails."""
    def notebook(source, stored):
        nb = nbformat.v4.new_notebook()
        cell = nbformat.v4.new_code_cell(source)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
        cell.execution_count = 1
        nb.cells = [cell]
        return nb

    code = 'print("recovered widths: [3]"); print("exact recovery: True"); print(f"rmse {1/3:.2e}")'
    cases = {"same.ipynb": "recovered widths: [3]\nexact recovery: True\nrmse 9.99e-01\n",
             "width.ipynb": "recovered widths: [4]\nexact recovery: True\nrmse 3.33e-01\n",
             "verdict.ipynb": "recovered widths: [3]\nexact recovery: False\nrmse 3.33e-01\n"}
    for name, stored in cases.items():
        nbformat.write(notebook(code, stored), tmp_path / name)
    proc = _pytest("--nbval", "--nbval-current-env", "--nbval-sanitize-with", str(SANITIZE),
                   "--rootdir", str(tmp_path), str(tmp_path), cwd=tmp_path)
    assert "1 passed" in proc.stdout and "2 failed" in proc.stdout, proc.stdout[-3000:]
    assert "same.ipynb" not in re.findall(r"FAILED (\S+)", proc.stdout)


# ---------------------------------------------------------------------------------------------
# The smoke book, built as `make book` builds it, then opened in a real browser.

@pytest.fixture(scope="module")
def smoke_book():
    """Build the smoke book from a copy of the sources (the working tree's book/executed and
    _build are left alone) with the same command as `make book`: `eandc book`."""
    digest = book._sources_digest()  # of eandc's sources, before the build
    with tempfile.TemporaryDirectory(prefix="eandc-book-") as tmp:
        root = Path(tmp)
        for name in ("_config.yml", "_toc.yml"):
            shutil.copy(ROOT / name, root / name)
        shutil.copytree(ROOT / "notebooks", root / "notebooks",
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
        shutil.copytree(ROOT / "book", root / "book", ignore=shutil.ignore_patterns("executed"))
        proc = subprocess.run([sys.executable, "-m", "eandc.cli", "book", "--profile", "smoke",
                               "--root", str(root)], capture_output=True, text=True, timeout=900,
                              env=dict(os.environ, TQDM_DISABLE="1"))
        yield root, proc, digest


def test_smoke_book_builds_with_warnings_as_errors(smoke_book):
    root, proc, digest = smoke_book
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    index = root / "_build" / "html" / "index.html"
    assert f"open {index}" in proc.stdout and index.is_file()
    assert "-W -n --keep-going" in proc.stdout
    for run in book.load_profile("smoke", root):
        nb = nbformat.read(run.output(root), as_version=4)
        assert nb.metadata["papermill"]["parameters"]["profile"] == "smoke"
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
                  if o.output_type == "error" or o.get("name") == "stderr"]
        assert errors == [], f"{run.name}: {errors}"
    before = book._sources_digest()
    again = subprocess.run([sys.executable, "-m", "eandc.cli", "book", "--profile", "smoke",
                            "--root", str(root)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    # unchanged notebooks are reused; in a working tree someone else is editing, eandc's
    # sources may change meanwhile, and then every notebook must be executed again
    changed = before != book._sources_digest() or before != digest
    word = "executed in" if changed else "up to date, reused"
    assert again.stdout.count(word) == len(book.load_profile("smoke", root)), again.stdout


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver are missing (.ci/run installs them)")
        pytest.skip("chromium/chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="eandc-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1280,1024"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver, profile


ERROR_SELECTORS = ".output.error, .output.stderr, .output.traceback, .system-message, .error"


def page_problems(driver, url: str, figures: int | None) -> list[str]:
    """What is wrong with the page at ``url``: not loaded, no title, an error or a traceback
    shown, an image that did not load or has no size, or not ``figures`` images."""
    driver.get(url)
    problems = []
    if driver.execute_script("return document.readyState") != "complete":
        problems.append("not loaded")
    title = driver.execute_script("const h = document.querySelector('article h1'); "
                                  "return h ? h.textContent : ''").strip().rstrip("#").strip()
    if not title or not driver.title.startswith(title):
        problems.append(f"title {driver.title!r}, heading {title!r}")
    body = driver.find_element("tag name", "body").text
    problems += [f"shows {bad!r}" for bad in ("Traceback", "ERR_FILE_NOT_FOUND", "Exception",
                                              "NameError") if bad in body]
    problems += [f"error output: {e.text[:80]!r}"
                 for e in driver.find_elements("css selector", ERROR_SELECTORS)]
    images = driver.find_elements("css selector", "article img")
    sizes = driver.execute_script(
        "return arguments[0].map(i => [i.complete, i.naturalWidth, i.naturalHeight, "
        "i.getBoundingClientRect().width, i.getBoundingClientRect().height])", images)
    problems += [f"image of size {size}" for complete, *size in sizes
                 if not complete or min(size) <= 0]
    if figures is not None and len(images) != figures:
        problems.append(f"{len(images)} images for {figures} figures")
    return problems


@pytest.fixture(scope="module")
def browser():
    driver, profile = _browser()
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_every_chapter_loads_in_headless_chromium_with_figures_and_no_errors(smoke_book, browser):
    root, proc, _ = smoke_book
    assert proc.returncode == 0, "the smoke book did not build"
    html = root / "_build" / "html"
    browser.get((html / "index.html").as_uri())
    assert browser.current_url.endswith("book/intro.html")  # index.html redirects to the intro
    for page in _toc_files():
        figures = None
        if page.startswith(book.EXECUTED):
            template = nbformat.read(ROOT / "notebooks" / f"{Path(page).name}.ipynb", as_version=4)
            figures = sum(c.source.rstrip().endswith("plt.show()")
                          for c in template.cells if c.cell_type == "code")
            assert figures > 0
        assert page_problems(browser, (html / f"{page}.html").as_uri(), figures) == [], page


def test_the_browser_check_sees_broken_images_and_tracebacks(smoke_book, browser, tmp_path):
    root, proc, _ = smoke_book
    assert proc.returncode == 0, "the smoke book did not build"
    page = root / "_build" / "html" / book.EXECUTED / "quickstart.html"
    html = page.read_text()
    broken = page.with_name("broken.html")
    html = re.sub(r'(<img [^>]*src=")', r"\1missing-", html, count=1)
    broken.write_text(html.replace("</article>", '<div class="output error"><pre>Traceback '
                                   "(most recent call last)</pre></div></article>", 1))
    problems = page_problems(browser, broken.as_uri(), 4)
    assert any("image of size" in p for p in problems), problems
    assert any("Traceback" in p for p in problems) and any("error output" in p for p in problems)
    missing = page_problems(browser, page.with_name("no-such-page.html").as_uri(), None)
    assert missing, "a missing page must be reported"
