"""The demo's console stays short: mmengine's environment banner (build flags, the whole config)
goes to the run's log file only."""
from __future__ import annotations

from pathlib import Path


def test_environment_banner_goes_to_the_log_file_not_the_console(tmp_path, capfd, tiny_base):
    from sa2va_demo.runs import BannerToFileRunner, tiny_config
    runner = BannerToFileRunner.from_cfg(tiny_config(tmp_path / "w", tiny_base, max_iters=1))
    console = capfd.readouterr()
    log = Path(runner.log_dir, f"{runner.timestamp}.log").read_text()
    assert "System environment" in log and "Runtime environment" in log and "Config:" in log
    shown = console.out + console.err
    assert "System environment" not in shown and "Config:" not in shown, shown[:2000]
    # and the console handler is back at its level afterwards: later INFO lines still show
    runner.logger.info("after the banner")
    assert "after the banner" in capfd.readouterr().out
