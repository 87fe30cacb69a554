"""Energy provenance: every stored value is named by its source; RAPL joules are converted, never estimated."""

import pytest

from bench import energy


class FakeRapl(energy.RaplMeter):
    """A readable powercap zone whose counter advances by a known amount (no RAPL on this machine)."""

    def __init__(self, readings):
        self.zones, self.readable, self._readings = ["zone0"], True, iter(readings)

    def _read(self):
        return [next(self._readings)]


def test_record_converts_measured_rapl_joules():
    metrics, tags = {}, {}
    rapl = FakeRapl([1_000_000, 4_000_000]).start()  # 3 J between start and stop
    energy.record(metrics, tags, "j_per_image", rapl, measured=lambda joules: joules / 6,
                  estimate=lambda: pytest.fail("the estimate must not run when RAPL is readable"))
    assert tags["energy_source"] == "rapl"
    assert metrics == {"energy.j_per_image.rapl": 0.5}


def test_record_labels_the_estimate_with_its_table():
    rapl = energy.RaplMeter()
    rapl.readable = False
    metrics, tags = {}, {}
    energy.record(metrics, tags, "prefill_j_per_token", rapl.start(),
                  measured=lambda joules: pytest.fail("no RAPL reading to convert"),
                  estimate=lambda: energy.estimate_joules({"fp32": 1e6, "int8": 1e6}, 400.0))
    assert tags["energy_source"] == "model:horowitz_isscc2014_45nm"
    # 1e6 x (3.7 + 0.9) pJ + 1e6 x (0.2 + 0.1) pJ + 100 DRAM reads x 640 pJ
    assert metrics["energy.prefill_j_per_token.model-horowitz_isscc2014_45nm"] == pytest.approx(4.964e-6)


def test_a_bare_source_is_refused():
    with pytest.raises(ValueError, match="not one of rapl, nvml"):
        energy.metric_name("j_per_image", "joulemeter")
    with pytest.raises(ValueError, match="not one of rapl, nvml"):
        energy.metric_name("j_per_image", "sim:zigzag+joulemeter")


def test_a_sum_of_two_sources_names_both():
    assert energy.metric_name("j_per_image", "sim:zigzag+model:horowitz_isscc2014_45nm_widthfit") == \
        "energy.j_per_image.sim-zigzag_and_model-horowitz_isscc2014_45nm_widthfit"
    assert energy.source_of("sim-zigzag_and_model-horowitz_isscc2014_45nm_widthfit") == \
        "sim:zigzag+model:horowitz_isscc2014_45nm_widthfit"
    assert energy.source_of("model-horowitz_isscc2014_45nm") == "model:horowitz_isscc2014_45nm"
