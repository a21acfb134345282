"""The main job (``make demo``): train every method's tiny model on the synthetic fine-detail task
and show that high resolution pays (:mod:`.run`); plus a tour of every method's plan of a bundled
image (:mod:`.tour`, ``hires demo --tour``)."""

from .run import DEMO_METHODS, DEMO_SIZES, QUICK, DemoConfig, run_demo
from .tour import make_demo_image, run_tour

__all__ = ["DEMO_METHODS", "DEMO_SIZES", "QUICK", "DemoConfig", "make_demo_image", "run_demo", "run_tour"]
