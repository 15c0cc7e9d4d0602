"""timm's feature-API tests (tests/test_models.py) are parametrised over timm's own modules; this runs them, unchanged,
on internimage_t and internimage_s. Collected by tools/timm_model_tests.sh, with timm's tests/ on the path."""
import pytest
import test_models as timm_suite

NAMES = ["internimage_t", "internimage_s"]


@pytest.mark.parametrize("model_name", NAMES)
@pytest.mark.parametrize("test", [timm_suite.test_model_forward_intermediates_features,
                                  timm_suite.test_model_forward_intermediates], ids=lambda t: getattr(t, "__name__", t))
def test_feature_api(test, model_name):
    test(model_name, 1)


@pytest.mark.parametrize("model_name", NAMES)
def test_prune_intermediate_layers_contract(model_name):
    timm_suite.test_prune_intermediate_layers_contract(model_name)
