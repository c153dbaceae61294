"""engine.logs: the tools' console handler prints each record of the library once."""

import logging

import pytest

from engine.logs import setup_logging


@pytest.fixture
def bare_root():
    root = logging.getLogger()
    saved = root.handlers[:]
    for handler in saved:
        root.removeHandler(handler)
    yield root
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in saved:
        root.addHandler(handler)


def test_a_later_basic_config_does_not_print_every_line_again(bare_root, capsys):
    setup_logging()
    logging.basicConfig(level=logging.INFO)  # what importing onnxruntime.quantization does
    logging.getLogger("deploy.export").info("wrote model_int8.onnx")
    err = capsys.readouterr().err
    assert err.count("wrote model_int8.onnx") == 1, err
