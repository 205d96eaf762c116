"""The README's commands and the CLI, run as a user runs them."""
import subprocess
import sys

from reference import sample_image

from edgelmm import EdgeLMM


def run(*args):
    return subprocess.run([sys.executable, "-m", "edgelmm.cli", *args], capture_output=True, text=True, timeout=300)


def test_demo_runs_offline():
    proc = run("demo")
    assert proc.returncode == 0, proc.stderr
    assert "answer" in proc.stdout and "prefill" in proc.stderr


def test_make_tiny_then_ask_matches_the_api(tmp_path):
    out = tmp_path / "m"
    assert run("make-tiny", "mipha", str(out)).returncode == 0
    image = tmp_path / "cat.png"
    sample_image(7).save(image)
    proc = run("ask", str(out), "--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    expected = EdgeLMM.load(out).ask(image, "What is it?", max_new_tokens=6)
    assert proc.stdout == expected + "\n"
    assert "decode" in proc.stderr


def test_make_tiny_refuses_to_overwrite(tmp_path):
    (tmp_path / "m").mkdir()
    proc = run("make-tiny", "tinyllava", str(tmp_path / "m"))
    assert proc.returncode == 2 and "already exists" in proc.stderr


def test_import_is_light():
    code = ("import sys, edgelmm; heavy = [m for m in ('torch', 'transformers', 'onnx', 'triton', 'edgelmm.export') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
