"""Chat about an image with a saved model: one question, or a session on text streams.

:func:`chat_session` reads one question per line from ``input`` and writes one answer per
question to ``output`` (whole answers: :meth:`HiresLMM.generate` does not stream). Commands:

* ``/image PATH`` switches to another image (a bad path prints an error and keeps the current one);
* ``/quit`` (or ``/exit``, or the end of the input) ends the session.

Each question is asked on its own about the current image (no history), wrapped in the model's
chat template. The image is prepared (loaded, planned, rendered) once and reused.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

from .predict import DEFAULT_TEMPLATE, IMAGE_PLACEHOLDER, load_model, training_template

if TYPE_CHECKING:
    from ..model import HiresLMM
    from ..processing import ImageInput


class ChatBot:
    """A model, its template and decoding settings, and the current image."""

    def __init__(self, model: str | HiresLMM, image: Any = None, *, template: str | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = 0, device: str | None = None) -> None:
        self.model, model_dir = load_model(model, device)
        self.template = template or training_template(model_dir, self.model) or DEFAULT_TEMPLATE
        self.generation = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
        self.image: ImageInput | None = None
        self.image_name: str | None = None
        if image is not None:
            self.set_image(image)

    def set_image(self, image: Any) -> None:
        """Load, plan and render ``image`` (a path, bytes or PIL image); raises ImageLoadError."""
        self.image = self.model.prepare_image(image)
        self.image_name = str(image) if not hasattr(image, "size") else "<image>"

    def ask(self, question: str) -> str:
        """The answer to one question about the current image (text-only when there is none)."""
        prompt = question
        if self.image is not None and IMAGE_PLACEHOLDER not in prompt:
            prompt = IMAGE_PLACEHOLDER + "\n" + prompt
        images: list[list[ImageInput]] = [[self.image]] if self.image is not None else [[]]
        if prompt.count(IMAGE_PLACEHOLDER) != len(images[0]):
            raise ValueError(f"{prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
                             f"for {len(images[0])} image(s)")
        return self.model.generate([prompt], images, template=self.template, **self.generation)[0].strip()


def chat_session(bot: ChatBot, input: TextIO = sys.stdin, output: TextIO = sys.stdout,
                 prompt: str | None = None) -> int:
    """Answer questions read from ``input`` line by line until ``/quit`` or the end of input.

    ``prompt`` is written before each read (default: ``"> "`` when ``input`` is a terminal, else
    nothing). Returns the number of questions answered.
    """
    from ..image import ImageLoadError

    if prompt is None:
        prompt = "> " if getattr(input, "isatty", lambda: False)() else ""
    answered = 0
    while True:
        if prompt:
            output.write(prompt)
            output.flush()
        line = input.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/image" or text.startswith("/image "):
            path = text[len("/image"):].strip()
            if not path:
                output.write(f"current image: {bot.image_name or 'none'}\n")
                continue
            try:
                bot.set_image(path)
            except ImageLoadError as e:
                output.write(f"error: {e}\n")
            else:
                output.write(f"image: {path}\n")
            output.flush()
            continue
        try:
            answer = bot.ask(text)
        except ValueError as e:
            output.write(f"error: {e}\n")
            continue
        output.write(answer + "\n")
        output.flush()
        answered += 1
    return answered


__all__ = ["ChatBot", "chat_session"]
