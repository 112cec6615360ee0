"""Every option under conf/ composes, passes the config checks, and instantiates."""
from __future__ import annotations

import copy
import inspect
import re
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from pyro.optim import PyroLRScheduler

from conftest import CONF_DIR, FAST, PROJECT_DIR, compose_config
from vae.build import build_likelihood, build_optimizer
from vae.config import ConfigError, bfloat16_units, check_config
from vae.rules import GROUPS, RULES, TOP_LEVEL, Check, Elsewhere, Mirror, leaves, rule_for, unruled

OPTIONS = sorted(
    (path.parent.name, path.stem) for path in CONF_DIR.glob("*/*.yaml") if path.parent.name != "experiment"
)  # (group, option) for every training file: a new file is tested without editing this test
# (conf/experiment/ holds recipes for every entry point: composed below, each with its own; the task
# group of evaluate.py is in tasks/conf/task/, and tests/test_evaluate.py composes those)


def test_every_group_has_options():
    groups = {group for group, _ in OPTIONS}
    assert groups == {"data", "model", "likelihood", "prior", "posterior", "estimator", "optim", "schedule", "trainer"}


# Options that work only together: each is composed with its partner (tests/test_hierarchy.py checks that
# either alone is refused in one line).
PARTNERS = {("prior", "two_layer"): "posterior=bottom_up", ("posterior", "bottom_up"): "prior=two_layer"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, tmp_path):
    partner = [PARTNERS[group, option]] if (group, option) in PARTNERS else []
    cfg = compose_config(f"{group}={option}", *partner)
    check_config(cfg)

    # The dataset's target exists and accepts the config's keys plus root and train.
    dataset_cls = get_class(cfg.data.dataset._target_)
    kwargs = {k: v for k, v in cfg.data.dataset.items() if k != "_target_"}
    inspect.signature(dataset_cls).bind(root=str(tmp_path), train=True, **kwargs)
    if dataset_cls.__module__ == "vae.data":  # file-free datasets are built for real
        dataset = instantiate(cfg.data.dataset, root=str(tmp_path), train=False)
        assert dataset.data.shape == (cfg.data.dataset.num_test, 16, 16) and dataset.data.dtype == torch.uint8
        assert len(dataset.targets) == len(dataset.data) and set(dataset.targets.tolist()) <= set(range(10))

    side = 28 if 28 % 2 ** len(cfg.model.channels) == 0 else 64  # MNIST's, or the 64x64 networks' (model=conv_64px)
    encoder = instantiate(cfg.model.encoder, image_shape=(1, side, side))
    likelihood = instantiate(cfg.likelihood, image_channels=1)
    decoder = instantiate(cfg.model.decoder, image_shape=(1, side, side), likelihood=likelihood)
    assert encoder.t_loc.out_features == decoder.latent_dim == cfg.model.latent_dim
    assert decoder.likelihood is likelihood
    optimizer = instantiate(cfg.optim)
    assert optimizer.pt_optim_constructor.__name__ == cfg.optim._target_.rsplit(".", 1)[-1]
    scheduled = build_optimizer(cfg)  # with a schedule: Pyro's wrapper of the same torch optimizer
    assert isinstance(scheduled, PyroLRScheduler) == (group == "schedule")
    assert scheduled.pt_optim_constructor is optimizer.pt_optim_constructor
    elbo = instantiate(cfg.estimator.elbo)
    assert elbo.num_particles == cfg.estimator.elbo.num_particles
    assert isinstance(cfg.estimator.reparameterized, bool)
    assert cfg.trainer.epochs >= 1


LIKELIHOODS = sorted(path.stem for path in (CONF_DIR / "likelihood").glob("*.yaml"))  # a new one: tested too
BAD_VALUES = {  # likelihood key -> (override value, what the refusal says) of values it must refuse
    "scale": [("x", "must be one of"), ("1", "must be one of")],
    "min_scale": [("0", "must be a finite number > 0"), ("-1", "must be a finite number > 0"),
                  ("inf", "must be a finite number > 0"), ("true", "must be a finite number > 0"),
                  ("x", "must be a finite number > 0")],
    "fixed_scale": [("0", "must be a finite number > 0"), ("-1", "must be a finite number > 0"),
                    ("nan", "must be a finite number > 0")],
    "components": [("0", "must be a positive integer"), ("2.5", "must be a positive integer"),
                   ("true", "must be a positive integer")],
    "logit_lambda": [("0", "must be a number between 0 and 0.5"), ("0.5", "must be a number between 0 and 0.5"),
                     ("-1", "must be a number between 0 and 0.5")],
}
GENERIC_BAD_VALUES = [("-1", ""), ("x", "")]  # a key not listed above: refused, whatever it says


def likelihood_keys(option: str) -> list[str]:
    """The keys of conf/likelihood/<option>.yaml besides its `_target_`."""
    return [key for key in compose_config(f"likelihood={option}").likelihood if key != "_target_"]


@pytest.mark.parametrize("option", LIKELIHOODS)
def test_every_likelihood_composes_passes_the_checks_and_refuses_a_bad_value_of_each_key(option):
    """`likelihood=<option>` composes, passes check_config and builds for gray and colour images (the
    Bernoulli: gray only); a bad value of each of its keys stops check_config in one line naming
    likelihood.<key> and the value (the likelihood checks its own keys when it is built)."""
    cfg = compose_config(f"likelihood={option}")
    check_config(cfg)
    assert get_class(cfg.likelihood._target_).__module__ in ("model", "vae.likelihoods")
    for channels in (1, 3):
        if option == "bernoulli" and channels == 3:
            with pytest.raises(ConfigError, match=r"^likelihood=bernoulli with 3-channel images"):
                build_likelihood(cfg.likelihood, channels)
            continue
        likelihood = build_likelihood(cfg.likelihood, channels)
        out = torch.zeros(2, channels * likelihood.params_per_pixel, 4, 4)
        assert likelihood(out).batch_shape == (2, channels, 4, 4)
    for key in likelihood_keys(option):
        for value, says in BAD_VALUES.get(key, GENERIC_BAD_VALUES):
            with pytest.raises(ConfigError) as error:
                check_config(compose_config(f"likelihood={option}", f"likelihood.{key}={value}"))
            message = str(error.value)
            assert message.startswith(f"likelihood.{key}=") and says in message, (key, value, message)
            assert "\n" not in message, message


@pytest.mark.parametrize("option", [o for o in LIKELIHOODS if "fixed_scale" in likelihood_keys(o)])
def test_a_fixed_scale_below_the_floor_is_refused(option):
    """scale=fixed with fixed_scale < min_scale: every scale of the likelihood is kept above the floor."""
    check_config(compose_config(f"likelihood={option}", "likelihood.scale=fixed", "likelihood.fixed_scale=0.01",
                                "likelihood.min_scale=0.001"))
    with pytest.raises(ConfigError, match=r"^likelihood.fixed_scale=0.001: below likelihood.min_scale=0.01"):
        check_config(compose_config(f"likelihood={option}", "likelihood.scale=fixed", "likelihood.fixed_scale=0.001",
                                    "likelihood.min_scale=0.01"))


def test_variants_hold_only_their_difference():
    """Each variant that inherits a sibling overrides only what differs."""
    assert compose_config("estimator=score").estimator.elbo == compose_config("estimator=reparam").estimator.elbo
    assert compose_config("estimator=score").estimator.reparameterized is False
    clipped = compose_config("optim=clipped_adam").optim
    assert clipped.optim_args.lr == compose_config("optim=adam").optim.optim_args.lr
    assert "clip_norm" in clipped.optim_args


def test_data_root_defaults_to_environment(monkeypatch):
    monkeypatch.setenv("VAE_DATA_ROOT", "/somewhere/data")
    assert compose_config().data.root == "/somewhere/data"
    monkeypatch.delenv("VAE_DATA_ROOT")
    assert compose_config().data.root == "data"


RECIPES = sorted(str(path.relative_to(CONF_DIR / "experiment").with_suffix("")) for path in
                 (CONF_DIR / "experiment").glob("*/*.yaml"))  # <study>/<step>: a study's recipes sit together
PRIMARY = {"train": "config", "evaluate": "evaluate", "variance": "variance", "bench": "bench", "faults": "faults"}


def recipe_command(recipe: str) -> tuple[str, bool]:
    """(the entry point a recipe is for, whether it is a multirun), from its header comment
    "# `python <entry>.py [-m] experiment=<study>/<step>`", which the docs quote."""
    header = (CONF_DIR / "experiment" / f"{recipe}.yaml").read_text().splitlines()[1]
    match = re.match(r"# `python (\w+)\.py (-m )?experiment=([\w/]+)`", header)
    assert match and match.group(3) == recipe, f"experiment/{recipe}.yaml: header {header!r}"
    return match.group(1), bool(match.group(2))


def test_recipes_are_grouped_by_study():
    """conf/experiment/<study>/: every recipe is one step of a study, no recipe lies outside one."""
    assert not list((CONF_DIR / "experiment").glob("*.yaml"))
    assert all("/" in recipe for recipe in RECIPES) and len(RECIPES) >= 40


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_with_its_entry_point(recipe):
    """Each recipe names its command in its header and composes with that entry point's config;
    a multirun recipe holds its sweep, a single run writes to a fixed directory, each named after the
    recipe: <study> for a study's `train` step, <study>_<step> for the others."""
    entry, multirun = recipe_command(recipe)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(PRIMARY[entry], overrides=[f"experiment={recipe}"], return_hydra_config=True)
    hydra_cfg = OmegaConf.to_container(cfg.hydra)
    study, step = recipe.split("/")
    name = study if step == "train" else f"{study}_{step}"
    if multirun:
        assert hydra_cfg["sweeper"]["params"] and hydra_cfg["sweep"]["dir"] == f"multirun/experiments/{name}"
    else:
        assert hydra_cfg["run"]["dir"] == f"outputs/experiments/{name}"
    if entry in ("train", "variance", "bench"):  # evaluation recipes name a run to load, which a test cannot have
        check_config(cfg)
        assert unruled(cfg) == [], f"keys without a rule in vae/rules.py: {unruled(cfg)}"


ARMS = sorted((path.parent.parent.name, path.stem) for path in (CONF_DIR / "experiment").glob("*/arm/*.yaml"))


@pytest.mark.parametrize("study,arm", ARMS, ids=[f"{s}/arm/{a}" for s, a in ARMS])
def test_every_arm_of_a_study_is_a_job_that_composes_and_checks(study, arm):
    """A study whose configurations differ in more than one group sweeps its arms, the files of
    conf/experiment/<study>/arm/: its train recipe sweeps each once, and each composes with it and passes."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={study}/train", f"+experiment/{study}/arm={arm}"],
                      return_hydra_config=True)
    swept = cfg.hydra.sweeper.params[f"+experiment/{study}/arm"].split(",")
    assert sorted(swept) == sorted(a for s, a in ARMS if s == study)
    check_config(cfg)
    assert unruled(cfg) == []


@pytest.mark.parametrize("flags,expected", [("fpu avx512f avx512_bf16 sse", True), ("fpu amx_bf16 amx_tile", True),
                                            ("fpu avx512f avx512_vnni", False)])
def test_bf16_follows_the_processors_bfloat16_units(flags, expected, tmp_path):
    """`${bf16_units:${device}}`: bfloat16 layers on a CPU whose flags name AMX or AVX-512 bfloat16 units (faster
    there, emulated and slower elsewhere: docs/results.md); the strongest recipes set trainer.bf16 by it."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert bfloat16_units("cpu", str(cpuinfo)) is expected
    assert bfloat16_units("cpu", str(tmp_path / "absent")) is False
    for recipe in ("best_one_hour/train", "model_levers/train"):
        assert compose_config(f"experiment={recipe}", "device=cpu").trainer.bf16 is bfloat16_units("cpu")


def test_estimators_recipe_sweeps_every_estimator_over_three_seeds():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=estimators/train"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    # every gradient estimator of the ELBO; iwae and dreg train a different (tighter) bound, compared on its own
    estimators = {path.stem for path in (CONF_DIR / "estimator").glob("*.yaml")} - {"iwae", "dreg"}
    assert set(params.estimator.split(",")) == estimators and params.seed == "0,1,2"
    assert cfg.trainer.epochs == 3 and cfg.hydra.launcher._target_.endswith("JoblibLauncher")


def test_help_lists_each_entry_points_own_groups():
    """`python train.py --help` lists the training groups; the task group is evaluate.py's alone, and
    evaluate.py's help (its own template: Hydra does not list a searchpath's groups) names every task."""
    def groups(script: str) -> set[str]:
        text = subprocess.run([sys.executable, script, "--help"], cwd=PROJECT_DIR, capture_output=True,
                              text=True, timeout=120, check=True).stdout
        listing = text.split("== Configuration groups ==")[1].split("== Config ==")[0]
        return {line.split(":")[0] for line in listing.splitlines()[2:] if ":" in line}

    listed = groups("train.py")  # the recipes by study: experiment/<study> with its steps
    assert {group for group in listed if not group.startswith("experiment/")} == {
        "data", "estimator", "likelihood", "model", "prior", "posterior", "optim", "schedule", "trainer"}
    assert {"experiment/one_hour", "experiment/bound_and_posterior"} <= listed
    tasks = {path.stem for path in (PROJECT_DIR / "tasks" / "conf" / "task").glob("*.yaml")}
    listing = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=PROJECT_DIR, capture_output=True,
                             text=True, timeout=120, check=True).stdout
    assert f"task: {', '.join(sorted(tasks))}\n" in listing and "estimator:" not in listing


# Every key of every option has a rule (vae/rules.py), and each rule refuses its bad values naming the key.
KEYED = sorted({(g, o) for g, o in OPTIONS if g not in ("likelihood", "prior", "posterior")} | {("config", "default")})
# (group, option): the groups whose keys the table checks; ("config", "default"): conf/config.yaml's own keys
# (the likelihood, prior and posterior groups check their own keys: the likelihood test above,
# tests/test_mixture_prior.py, tests/test_flows.py)


def option_config(group: str, option: str):
    return compose_config() if group == "config" else compose_config(f"{group}={option}")


def option_keys(group: str, cfg) -> list[str]:
    """The keys that the option of `group` composes: those under `group.`, or conf/config.yaml's own."""
    return [key for key, _ in leaves(cfg) if (key in TOP_LEVEL if group == "config" else key.startswith(f"{group}."))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_every_key_of_every_option_has_a_rule(group, option):
    """A key that no rule covers (a new option's key, added later) fails here until it gets its rule."""
    cfg = compose_config(f"{group}={option}")
    assert unruled(cfg) == [], f"keys without a rule in vae/rules.py: {unruled(cfg)}"
    walked = {key.split(".")[0] for key, _ in leaves(cfg)}  # every group (schedule: null unless chosen)
    assert walked == {*TOP_LEVEL, *GROUPS} - ({"schedule"} if group != "schedule" else set())


def test_a_key_without_a_rule_is_found():
    cfg = compose_config("+trainer.new_option=1", "+optim.optim_args.amsgrad=true", "+model.encoder.dropout=0.1")
    assert unruled(cfg) == ["model.encoder.dropout", "trainer.new_option"]  # amsgrad: torch's, with its rule
    check_config(compose_config("+trainer.new_option=1"))  # the test above is what refuses it, not a run


@pytest.mark.parametrize("group,option", KEYED, ids=[f"{g}/{o}" for g, o in KEYED])
def test_every_key_refuses_its_bad_values_in_one_line_naming_it(group, option):
    """Table-driven: the option composes and passes; for each of its keys, each bad value of its rule
    (a Mirror: its source's) stops check_config in one line "<key>=<value>: <what it must be>"."""
    cfg = option_config(group, option)
    check_config(cfg)
    parser = OverridesParser.create()
    tried = 0
    for key in option_keys(group, cfg):
        rule = rule_for(key)
        if isinstance(rule, Elsewhere):
            continue
        for bad in (rule if isinstance(rule, Check) else RULES[rule.source]).bad:  # a Mirror: its source's rule
            changed = copy.deepcopy(cfg)  # the override's value as Hydra parses it (composing anew: a minute)
            OmegaConf.update(changed, key, parser.parse_override(f"{key}={bad}").value(), merge=True)
            with pytest.raises(ConfigError) as error:
                check_config(changed)
            message = str(error.value)
            assert message.startswith(f"{key}=") and message.endswith(rule.says), (bad, message)
            assert "\n" not in message, message
            tried += 1
    assert tried > 0


@pytest.mark.parametrize("key", sorted(RULES))
def test_every_rule_has_bad_values_and_says_what_the_value_must_be(key):
    rule = RULES[key]
    if isinstance(rule, Check):
        assert rule.bad and rule.says
    elif isinstance(rule, Mirror):
        assert rule.source in RULES and isinstance(RULES[rule.source], Check)
    else:
        assert isinstance(rule, Elsewhere) and rule.why


def test_the_rules_of_torch_arguments_name_real_arguments():
    """Each optim.optim_args.* rule is an argument of an optimizer of conf/optim/, each schedule.* rule one of a
    scheduler of conf/schedule/ (a misspelt rule would check a key that never comes)."""
    def taken(group: str) -> set[str]:
        names = set()
        for option in sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml")):
            cfg = compose_config(f"{group}={option}")
            target = (instantiate(cfg.optim).pt_optim_constructor if group == "optim"
                      else get_class(cfg.schedule._target_))
            names |= set(inspect.signature(target).parameters)
        return names

    optim_args = {key.rsplit(".", 1)[1] for key in RULES if key.startswith("optim.optim_args.")}
    schedule = {key.split(".", 1)[1] for key in RULES if key.startswith("schedule.") and "._" not in key}
    assert optim_args - taken("optim") == set()
    assert schedule - taken("schedule") == set()


ISSUE_CASES = {  # issue 32: each accepted, or failing late, before its rule
    ("optim=clipped_adam", "optim.optim_args.clip_norm=-1"):
        "optim.optim_args.clip_norm=-1: must be a finite number > 0, the bound of each gradient",
    ("schedule=cosine", "schedule.eta_min=nan"):
        "schedule.eta_min=nan: must be a finite number >= 0, the last epoch's learning rate",
    ("estimator=score_avg_baseline", "estimator.baseline.baseline_beta=5"):
        "estimator.baseline.baseline_beta=5: must be a number in [0, 1), the decay of the average baseline",
    ("trainer.bf16=maybe",): "trainer.bf16='maybe': must be true or false",
    ("trainer.bf16=1",): "trainer.bf16=1: must be true or false",
    ("data.drop_last=sometimes",): "data.drop_last='sometimes': must be true (every batch full) or false",
    ("optim.optim_args.fused=maybe",):
        "optim.optim_args.fused='maybe': must be null (torch's choice), true (one fused kernel) or false",
    ("schedule=constant", "schedule.total_iters=-1"): "schedule.total_iters=-1: must be a whole number of epochs",
    ("schedule=constant", "schedule.factor=-3"):
        "schedule.factor=-3: must be a number in (0, 1], the learning rate's share for total_iters epochs",
    # keys that must fit together, or fit their class (the list of what it takes is torch's and Pyro's)
    ("schedule=cosine", "schedule.eta_min=0.01"): "schedule.eta_min=0.01 with optim.optim_args.lr=0.001: the cosine "
        "falls from the learning rate to eta_min; give an eta_min at most optim.optim_args.lr",
    ("schedule=cosine", "trainer.epochs=0"): "trainer.epochs=0: must be a positive integer",  # not the T_max copying it
    ("optim=clipped_adam", "+optim.optim_args.fused=true"):
        "optim.optim_args.fused=True: not an argument of pyro.optim.clipped_adam.ClippedAdam; it takes betas, ",
    ("schedule=constant", "+schedule.T_max=3"):
        "schedule.T_max=3: not an argument of torch.optim.lr_scheduler.ConstantLR; it takes factor, ",
    ("+data.dataset.size=8",): "data.dataset.size=8: not an argument of torchvision.datasets.mnist.MNIST; it takes ",
    ("+estimator.elbo.vectorise_particles=true",):
        "estimator.elbo.vectorise_particles=True: not an argument of pyro.infer.trace_elbo.Trace_ELBO; it takes ",
}


@pytest.mark.parametrize("overrides,message", list(ISSUE_CASES.items()), ids=[" ".join(o) for o in ISSUE_CASES])
def test_the_issue_cases_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_config(compose_config(*overrides))
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    assert message.endswith(" ") or str(error.value) == message  # a prefix ends with a space


def test_a_refusal_by_a_rule_is_one_line_before_any_directory(tmp_path):
    result = subprocess.run([sys.executable, str(PROJECT_DIR / "train.py"), "data=synthetic", "trainer.bf16=maybe"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert result.stderr == "error: trainer.bf16='maybe': must be true or false\n", result.stderr
    assert list(tmp_path.iterdir()) == []


GOOD = [  # values the rules must let through
    ("schedule=cosine", "schedule.eta_min=1e-5"),
    ("schedule=constant", "schedule.factor=0.5", "schedule.total_iters=3"),
    ("+optim.optim_args.amsgrad=true", "+optim.optim_args.betas=[0.5,0.9]", "optim.optim_args.fused=null"),
    ("optim=clipped_adam", "optim.optim_args.clip_norm=1", "+optim.optim_args.lrd=0.999"),
    ("estimator=score_avg_baseline", "estimator.baseline.baseline_beta=0"),
    ("trainer.bf16=true", "data.drop_last=true"),
    ("data=synthetic", "+data.dataset.size=8"),
]


@pytest.mark.parametrize("overrides", GOOD, ids=[" ".join(o) for o in GOOD])
def test_good_values_pass(overrides):
    check_config(compose_config(*overrides))


def test_networks_whose_latent_dimensions_differ_are_refused_in_one_line():
    """model.encoder.latent_dim set apart from model.latent_dim (a copy, checked by its source's rule) would
    give the decoder codes of another size: build_networks refuses it, naming the keys."""
    from vae.build import build_networks

    with pytest.raises(ConfigError, match=r"^model\.latent_dim=4 and model\.encoder\.latent_dim=5 and "
                                          r"model\.decoder\.latent_dim=4: ") as refused:
        build_networks(compose_config(*FAST, "model.encoder.latent_dim=5"), (1, 16, 16), torch.device("cpu"))
    assert "\n" not in str(refused.value)
