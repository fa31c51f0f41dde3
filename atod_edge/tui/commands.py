"""Command palette entries: one for every app action and every action of the current screen."""

from __future__ import annotations

from functools import partial

from textual.binding import Binding
from textual.command import DiscoveryHit, Hit, Hits, Provider


def screen_commands(app, screen) -> list[tuple[str, str, object]]:
    """(title, help, callback) for each described binding of the app and of `screen`."""
    out = []
    seen = set()
    for owner, bindings in ((screen, getattr(screen, "BINDINGS", [])), (app, app.BINDINGS)):
        for b in bindings:
            b = b if isinstance(b, Binding) else Binding(*b)
            if not b.description or b.action in seen or b.action == "command_palette":
                continue
            seen.add(b.action)
            key = b.key.split(",")[0]
            out.append((b.description, f"key: {key}", partial(owner.run_action, b.action)))
    return out


class AtodCommands(Provider):
    """Lists the actions bound to keys on the current screen and in the app."""

    def _commands(self):
        # the palette is itself a screen: act on the screen that was active beneath it
        target = self.screen
        return screen_commands(self.app, target)

    async def discover(self) -> Hits:
        for title, help_text, callback in self._commands():
            yield DiscoveryHit(title, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._commands():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)
