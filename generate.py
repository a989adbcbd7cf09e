"""Generate text from a trained model, streaming tokens to the terminal as they are produced.

    python generate.py checkpoint=outputs/make_train/model prompt="Once upon a time"
    python generate.py checkpoint=PATH prompt="The" max_new_tokens=100 temperature=0.7 top_k=50 top_p=0.9
    python generate.py checkpoint=PATH prompt="The" greedy=true             # argmax decoding
    python generate.py checkpoint=PATH prompt="The" num_samples=3 seed=1    # reproducible samples

`checkpoint` is anything evaluate.py reads (exported or Hugging Face model directory, Lightning .ckpt,
DeepSpeed directory). Options and defaults: `GenerateConfig` in memoryformer/generation.py. A bad option
(a misspelt one such as `topp=0.9` included) or checkpoint prints one sentence on stderr and exits 2.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from memoryformer.conf_schema import register_configs
from memoryformer.errors import exit_on_user_error, reports_user_errors

register_configs()  # evaluate_defaults / generate_defaults: the options and their defaults


# reports_user_errors: a bad option or checkpoint ends in one sentence and exit status 2
@reports_user_errors
@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    """Validate the options, then stream the samples to stdout."""
    from memoryformer.generation import GenerateConfig, run_generation

    with exit_on_user_error():
        config = GenerateConfig.from_mapping(cfg)
        run_generation(config)


if __name__ == "__main__":
    main()
