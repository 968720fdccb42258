"""dse.layouts: the numerics choices a study stores per architecture and device kind, decided by a rule, reused."""

import optuna
import torch
from trainers import quick

from dse.layouts import ATTR, Numerics, attr_key, device_kind, ensure, figures, rule
from dse.step import native_bf16


def test_the_cpu_s_kind_names_its_model_and_whether_it_has_bf16_units():
    kind = device_kind(torch.device("cpu"))
    assert kind.startswith("cpu ") and kind.endswith(" bf16" if native_bf16(torch.device("cpu")) else " no-bf16")
    assert kind == device_kind(torch.device("cpu"))


def test_the_rule_is_a_function_of_the_device_alone():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert rule(quick(), cpu) == Numerics("contiguous", vmapped=False, cuda_graph=False)
    assert rule(quick(cuda_graph=True), cuda) == Numerics("channels_last", vmapped=True, cuda_graph=True)
    assert rule(quick(cuda_graph=False), cuda).cuda_graph is False


def test_a_choice_is_decided_once_stored_and_reused_with_its_advice():
    study = optuna.create_study()
    calls = []

    def decide():
        calls.append(1)
        return Numerics("contiguous", False, False)

    key, first = ensure(study, "cpu X no-bf16", '{"a":1}', decide, advice=lambda: "channels_last")
    assert key == attr_key("cpu X no-bf16", '{"a":1}') == ATTR + 'cpu X no-bf16:{"a":1}'
    stored = study.user_attrs[key]
    assert (stored["memory_format"], stored["faster"]) == ("contiguous", "channels_last")
    assert stored["device_kind"] == "cpu X no-bf16"
    again = ensure(study, "cpu X no-bf16", '{"a":1}', lambda: Numerics("channels_last", True, True))
    assert again == (key, first) and calls == [1]  # the stored choice wins over another decision
    assert list(figures(study.user_attrs)) == [key]


def test_advice_that_fails_changes_no_choice():
    def broken():
        raise RuntimeError("out of memory")

    study = optuna.create_study()
    key, choice = ensure(study, "k", "a", lambda: Numerics("contiguous", False, False), advice=broken)
    assert choice.memory_format == "contiguous"
    assert study.user_attrs[key]["faster"].startswith("not timed (RuntimeError")
