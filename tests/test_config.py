"""Configuration: defaults, command parsing, macros and every validation error."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.config import ConfigError, load_config, parse_config, refuse_self_proxy
from llamaswap.config.yamltext import load_yaml
from llamaswap.reload import ConfigReloader
from llamaswap.tap import InvalidConfig, Options, makeService

ROOT = Path(__file__).resolve().parent.parent


class DefaultsTests(SynchronousTestCase):
    def test_minimal_model_gets_the_documented_defaults(self) -> None:
        config = parse_config("models:\n  m:\n    cmd: llama-server --port ${PORT}\n")
        self.assertEqual(config.health_check_timeout, 120)
        self.assertEqual(config.start_port, 5800)
        self.assertEqual(config.log_level, "info")
        model = config.models["m"]
        self.assertEqual(model.proxy, "http://127.0.0.1:${PORT}")
        self.assertEqual(model.proxy_url(5901), "http://127.0.0.1:5901")
        self.assertEqual(model.check_endpoint, "/health")
        self.assertEqual(model.ttl, 0)
        self.assertEqual(model.aliases, ())
        self.assertFalse(model.unlisted)
        self.assertIsNone(model.use_model_name)
        self.assertIsNone(model.cmd_stop)

    def test_multi_line_cmd_drops_comments_and_splits_like_a_shell(self) -> None:
        config = parse_config(
            "models:\n"
            "  m:\n"
            "    cmd: |\n"
            "      llama-server --port ${PORT}\n"
            "      # a comment line\n"
            "        -m '/models/my model.gguf' \\\n"
            '        --chat-template "a b"\n'
            "    kvCache: false\n"
        )
        self.assertEqual(
            config.models["m"].cmd.render(9000),
            [
                "llama-server",
                "--port",
                "9000",
                "-m",
                "/models/my model.gguf",
                "--chat-template",
                "a b",
            ],
        )

    def test_shell_syntax_is_not_interpreted(self) -> None:
        config = parse_config(
            "models:\n  m:\n    cmd: server --port ${PORT} ; rm -rf / && echo $HOME\n"
        )
        argv = config.models["m"].cmd.render(1)
        self.assertIn(";", argv)
        self.assertIn("$HOME", argv)

    def test_check_endpoint_none_skips_health_checks(self) -> None:
        config = parse_config(
            "models:\n  m:\n    cmd: server --port ${PORT}\n    checkEndpoint: none\n"
        )
        self.assertIsNone(config.models["m"].check_endpoint)

    def test_fixed_proxy_without_port_macro(self) -> None:
        config = parse_config(
            "models:\n  m:\n    cmd: docker run -p 9999:8080 img\n    proxy: http://127.0.0.1:9999\n"
        )
        self.assertFalse(config.models["m"].uses_port)
        self.assertEqual(config.models["m"].proxy_url(None), "http://127.0.0.1:9999")

    def test_aliases_resolve_and_unlisted_models_are_hidden_from_the_list(self) -> None:
        config = parse_config(
            "models:\n"
            "  big:\n    cmd: s --port ${PORT}\n    aliases: [gpt-4o, smart]\n"
            "  hidden:\n    cmd: s --port ${PORT}\n    unlisted: true\n"
        )
        resolved = config.resolve("smart")
        assert resolved is not None
        self.assertEqual(resolved.id, "big")
        self.assertIsNone(config.resolve("nope"))
        self.assertEqual(config.listed_ids(), ["big"])
        self.assertIsNotNone(config.resolve("hidden"))


class MacroTests(SynchronousTestCase):
    def test_user_macros_model_id_and_macro_in_macro(self) -> None:
        config = parse_config(
            "macros:\n"
            "  bin: /opt/llama/llama-server\n"
            "  base: ${bin} --port ${PORT}\n"
            "models:\n"
            "  qwen:\n"
            "    cmd: ${base} --alias ${MODEL_ID}\n"
            "    name: The ${MODEL_ID} model\n"
            "    cmdStop: kill -TERM ${PID}\n"
            "    kvCache: false\n"
        )
        model = config.models["qwen"]
        self.assertEqual(
            model.cmd.render(7001),
            ["/opt/llama/llama-server", "--port", "7001", "--alias", "qwen"],
        )
        self.assertEqual(model.name, "The qwen model")
        assert model.cmd_stop is not None
        self.assertEqual(model.cmd_stop.render(pid=4242), ["kill", "-TERM", "4242"])

    def test_unknown_macro_names_the_key_path(self) -> None:
        error = self.assertRaises(
            ConfigError,
            parse_config,
            "models:\n  m:\n    cmd: s --port ${PORT} ${nope}\n",
            "c.yaml",
        )
        self.assertIn("c.yaml: models.m.cmd: unknown macro ${nope}", str(error))

    def test_macro_using_a_later_macro_is_an_error(self) -> None:
        error = self.assertRaises(
            ConfigError, parse_config, "macros:\n  a: ${b}\n  b: x\nmodels:\n  m:\n    cmd: s\n"
        )
        self.assertIn("macros.a: unknown macro ${b}", str(error))

    def test_reserved_macro_names(self) -> None:
        error = self.assertRaises(
            ConfigError, parse_config, "macros:\n  PORT: 1\nmodels:\n  m:\n    cmd: s\n"
        )
        self.assertIn("macros.PORT", str(error))
        self.assertIn("reserved", str(error))

    def test_environment_variables(self) -> None:
        text = "macros:\n  bin: ${env.LLAMA_BIN}\nmodels:\n  m:\n    cmd: ${bin} --port ${PORT}\n"
        config = parse_config(text, environ={"LLAMA_BIN": "/opt/llama server"})
        self.assertEqual(config.models["m"].cmd.render(1), ["/opt/llama", "server", "--port", "1"])
        error = self.assertRaises(ConfigError, parse_config, text, "c.yaml", {})
        self.assertIn(
            "c.yaml: macros.bin: ${env.LLAMA_BIN}: environment variable LLAMA_BIN", str(error)
        )
        self.assertIn("is not set", str(error))

    def test_pid_outside_cmd_stop_is_an_error(self) -> None:
        error = self.assertRaises(
            ConfigError, parse_config, "models:\n  m:\n    cmd: s --port ${PORT} ${PID}\n"
        )
        self.assertIn("models.m.cmd: ${PID} cannot be used here", str(error))


class ValidationTests(SynchronousTestCase):
    def error(self, text: str) -> str:
        return str(self.assertRaises(ConfigError, parse_config, text, "conf.yaml"))

    def test_unknown_keys_get_a_did_you_mean_hint(self) -> None:
        self.assertIn(
            "conf.yaml: healthCheckTimout: unknown key (did you mean 'healthCheckTimeout'?)",
            self.error("healthCheckTimout: 5\nmodels:\n  m:\n    cmd: s --port ${PORT}\n"),
        )
        self.assertIn(
            "models.m.ttls: unknown key (did you mean 'ttl'?)",
            self.error("models:\n  m:\n    cmd: s --port ${PORT}\n    ttls: 5\n"),
        )

    def test_yaml_errors_name_the_line(self) -> None:
        tab = self.error("models:\n  m:\n\tcmd: s --port ${PORT}\n")
        self.assertIn("conf.yaml: not valid YAML: line 3, column 1: found character '\\t'", tab)
        self.assertIn("replace the tab with spaces", tab)
        self.assertNotIn("<unicode string>", tab)
        quote = self.error('models:\n  m:\n    cmd: "s --port ${PORT}\n')
        self.assertIn("(while scanning a quoted scalar at line 3, column 10)", quote)

    def test_a_key_given_twice_is_refused(self) -> None:
        model = "  m:\n    cmd: s --port ${PORT}\n"
        self.assertIn(
            "conf.yaml: line 4, column 3: 'm' is given twice in the same map (first on line 2)",
            self.error("models:\n" + model + model),
        )
        self.assertIn(
            "line 5, column 5: 'ttl' is given twice in the same map (first on line 4)",
            self.error("models:\n" + model + "    ttl: 5\n    ttl: 6\n"),
        )
        merged = "models:\n  a: &a\n    cmd: s --port ${PORT}\n    ttl: 5\n"
        merged += "  b:\n    <<: *a\n    ttl: 6\n"
        self.assertEqual(parse_config(merged, "conf.yaml").models["b"].ttl, 6)

    def test_a_key_yaml_reads_as_a_number_is_refused(self) -> None:
        model = "models:\n  m:\n    cmd: s --port ${PORT}\n"
        for written in ("0123", "1_000", "1.5e+3", "[1, 2]", "{name: k, key: 0777, models: [m]}"):
            message = self.error(model + f"apiKeys:\n  - {written}\n")
            self.assertIn("a key must be a string", message)
            self.assertIn("quote it", message)
            for digits in ("123", "83", "1000", "1500", "777", "511"):
                self.assertNotIn(digits, message.split("(YAML reads")[0])
        config = parse_config(model + "apiKeys:\n  - '0123'\n")
        self.assertEqual([k.key for k in config.api_keys], ["0123"])

    def test_yaml_and_key_errors_never_echo_a_key(self) -> None:
        model = "models:\n  m:\n    cmd: s --port ${PORT}\n"
        twice = self.error(model + "apiKeys:\n  - {name: a, key: sk-one, key: sk-two}\n")
        self.assertIn("'key' is given twice", twice)
        tab = self.error(model + "apiKeys:\n\t- sk-one\n")
        self.assertIn("line 5, column 1", tab)
        not_a_list = self.error(model + "apiKeys: sk-one\n")
        self.assertIn("apiKeys: expected a list of keys (apiKeys: [<key>]), got str", not_a_list)
        for message in (twice, tab, not_a_list):
            self.assertNotIn("sk-", message)

    def test_no_error_echoes_a_key_that_yaml_reads_as_something_else(self) -> None:
        """A key YAML takes for an alias (``*...``) or a tag (``!...``), and an ``env``
        entry that is not NAME=value: the error says where, never the value."""
        model = "models:\n  m:\n    cmd: s --port ${PORT}\n"
        alias = self.error(model + "apiKeys:\n  - *Sk9secret\n")
        self.assertIn("line 5, column 5: found undefined alias", alias)
        tag = self.error(model + "apiKeys:\n  - !Sk9secret\n")
        self.assertIn("line 5, column 5: could not determine a constructor for the tag", tag)
        dashed = self.error(model + "    env: [HF-TOKEN=Sk9secret]\n")
        self.assertIn(
            "models.m.env[0]: expected NAME=value (NAME: letters, digits, _), got the name "
            "'HF-TOKEN'",
            dashed,
        )
        spaced = self.error(model + "    env: ['HF_TOKEN Sk9secret']\n")
        self.assertIn("models.m.env[0]: expected NAME=value", spaced)
        for message in (alias, tag, dashed, spaced):
            self.assertNotIn("Sk9secret", message)

    def test_a_merge_key_override_in_an_anchored_map_is_no_repeated_key(self) -> None:
        """``b`` merges ``a`` and overrides its ttl: valid YAML.  ``c`` (nearer the top,
        so built first) merges ``b``, and PyYAML then writes ``a``'s keys into ``b``'s
        node: the repeated-key check must read the keys as written."""
        text = "a: &a {cmd: s, ttl: 5}\ndeeper:\n  b: &b {<<: *a, ttl: 6}\nc: {<<: *b}\n"
        self.assertEqual(
            load_yaml(text, "conf.yaml"),
            {
                "a": {"cmd": "s", "ttl": 5},
                "deeper": {"b": {"cmd": "s", "ttl": 6}},
                "c": {"cmd": "s", "ttl": 6},
            },
        )

    def test_deep_nesting_is_a_config_error(self) -> None:
        """Not a RecursionError's traceback (PyYAML recurses per level)."""
        for text in (
            "a: " + "[" * 5000 + "]" * 5000 + "\n",
            "? " + "[" * 300 + "]" * 300 + "\n: 1\n",
        ):
            self.assertIn("conf.yaml: not valid YAML", self.error(text))

    def test_unknown_model_references_list_the_models(self) -> None:
        self.assertIn(
            "groups.g.members[0]: unknown model 'zzz' (known models: m)",
            self.error(
                "models:\n  m:\n    cmd: s --port ${PORT}\ngroups:\n  g:\n    members: [zzz]\n"
            ),
        )

    def test_a_model_file_that_is_not_there_is_a_notice(self) -> None:
        text = "models:\n  m:\n    cmd: sh --port ${PORT} -m /nowhere/m.gguf\n"
        config = parse_config(text, "conf.yaml")  # not an error: a disk may come later
        self.assertEqual(
            config.notices,
            (
                "models.m.cmd: /nowhere/m.gguf: no such file (yet); "
                "the model cannot start until it is there",
            ),
        )

    def test_a_program_that_is_not_there_is_a_notice_once(self) -> None:
        text = (
            "models:\n"
            "  a:\n    cmd: lama-server --port ${PORT}\n"  # a typo
            "  b:\n    cmd: lama-server --port ${PORT} --ctx-size 8\n"
            "  c:\n    cmd: /nowhere/bin/llama-server --port ${PORT}\n"
            "  d:\n    cmd: sh --port ${PORT}\n"  # on PATH
            "  e:\n    cmd: sh --port ${PORT}\n    env: [PATH=/nowhere/bin]\n"
        )
        config = parse_config(text, "conf.yaml", {"PATH": os.environ["PATH"]})
        self.assertEqual(
            config.notices,
            tuple(
                f"models.{model}.cmd: {program}: command not found (check cmd and PATH); "
                "the models that use it cannot start until it is there"
                for model, program in [
                    ("a", "lama-server"),
                    ("c", "/nowhere/bin/llama-server"),
                    ("e", "sh"),  # not on its own PATH
                ]
            ),
        )
        self.assertEqual(set(config.models), {"a", "b", "c", "d", "e"})  # all served

    def test_port_without_braces_is_explained(self) -> None:
        self.assertIn(
            "($PORT without braces is passed on as it is)",
            self.error("models:\n  m:\n    cmd: s --port $PORT\n"),
        )

    def test_structure_errors(self) -> None:
        self.assertIn("the file is empty", self.error(""))
        self.assertIn("models: required key is missing", self.error("logLevel: info\n"))
        self.assertIn("models: expected a map, got a list", self.error("models: [a, b]\n"))
        self.assertIn("models: at least one model", self.error("models: {}\n"))
        self.assertIn("models.m.cmd: required key is missing", self.error("models:\n  m: {}\n"))
        self.assertIn("models.m: expected a map", self.error("models:\n  m: llama-server\n"))
        self.assertIn("not valid YAML", self.error("models: [\n"))

    def test_value_errors_show_the_bad_value(self) -> None:
        base = "models:\n  m:\n    cmd: s --port ${PORT}\n"
        self.assertIn(
            "models.m.ttl: expected a number, got str 'soon'", self.error(base + "    ttl: soon\n")
        )
        self.assertIn("models.m.ttl: must be 0 (never)", self.error(base + "    ttl: -1\n"))
        self.assertIn(
            "startPort: must be a port number 1-65535, got 70000",
            self.error("startPort: 70000\n" + base),
        )
        self.assertIn(
            "healthCheckTimeout: must be a positive", self.error("healthCheckTimeout: 0\n" + base)
        )
        self.assertIn("logLevel: must be one of", self.error("logLevel: loud\n" + base))
        self.assertIn(
            "models.m.unlisted: expected true or false", self.error(base + "    unlisted: maybe\n")
        )
        self.assertIn(
            "models.m.env[0]: expected NAME=value (NAME: letters, digits, _), got 'JUSTNAME'",
            self.error(base + "    env: [JUSTNAME]\n"),
        )
        self.assertIn("models.m.aliases: expected a list", self.error(base + "    aliases: x\n"))
        self.assertIn(
            "models.m.cmd: the command is empty", self.error("models:\n  m:\n    cmd: '  '\n")
        )
        self.assertIn("cannot split", self.error("models:\n  m:\n    cmd: s 'unterminated\n"))
        self.assertIn("expected an http:// URL", self.error(base + "    proxy: ftp://x\n"))

    def test_a_server_url_with_user_info_is_refused(self) -> None:
        """Its user and password would never be sent (and the name before ``@`` would
        be looked up as a host): said at load, with the setting that sends a key."""
        self.assertIn(
            "models.m.proxy: user info (user:password@) in the URL is not sent to the "
            "server; give its key as upstreamApiKey",
            self.error("models:\n  m:\n    cmd: s\n    proxy: http://u:p@127.0.0.1:9/\n"),
        )
        self.assertIn(
            "peers.p.proxy: user info (user:password@) in the URL is not sent to the "
            "server; give its key as apiKey",
            self.error("peers:\n  p: {proxy: 'https://u:p@box:8080', models: [m]}\n"),
        )
        self.assertNotIn(  # an @ further on is the path's business
            "user info",
            self.error("bogus: 1\npeers:\n  p: {proxy: 'http://box:8080/a@b', models: [m]}\n"),
        )

    def test_default_proxy_needs_port_in_cmd(self) -> None:
        message = self.error("models:\n  m:\n    cmd: llama-server --port 8000\n")
        self.assertIn("models.m.cmd: the command does not use ${PORT}", message)

    def test_alias_conflicts(self) -> None:
        self.assertIn(
            "models.b.aliases[0]: alias 'x' is also used by 'a'",
            self.error(
                "models:\n  a:\n    cmd: s --port ${PORT}\n    aliases: [x]\n"
                "  b:\n    cmd: s --port ${PORT}\n    aliases: [x]\n"
            ),
        )
        self.assertIn(
            "alias 'a' is already a model id",
            self.error(
                "models:\n  a:\n    cmd: s --port ${PORT}\n"
                "  b:\n    cmd: s --port ${PORT}\n    aliases: [a]\n"
            ),
        )

    def test_missing_file_names_the_file(self) -> None:
        error = self.assertRaises(ConfigError, load_config, "/nonexistent/llamaswap.yaml")
        self.assertIn("/nonexistent/llamaswap.yaml: cannot read file", str(error))


MODEL = "    cmd: s --port ${PORT}\n"


class EveryProblemTests(SynchronousTestCase):
    """A file with several mistakes gets them all in one run: one line each, a
    model entry, a section or a reference each on its own."""

    def problems(self, text: str) -> ConfigError:
        error: ConfigError = self.assertRaises(ConfigError, parse_config, text, "c.yaml", {})
        return error

    def test_one_problem_reads_as_it_always_did(self) -> None:
        error = self.problems("models:\n  a:\n" + MODEL + "    ttl: ten\n")
        self.assertEqual(str(error), "c.yaml: models.a.ttl: expected a number, got str 'ten'")
        self.assertEqual(
            (error.path, error.message), ("models.a.ttl", "expected a number, got str 'ten'")
        )
        self.assertEqual(error.problems, (error,))

    def test_each_entry_and_section_is_reported_in_one_go(self) -> None:
        text = (
            "models:\n  a:\n" + MODEL + "    ttl: ten\n"
            "  b:\n" + MODEL + "    aliasses: [x]\n"
            "  c:\n" + MODEL + ""
            "groups:\n  g:\n    members: [c, zzz]\n"
            "scheduler:\n  policy: fifo\n  maxWait: 3\n"
            "connections:\n  perClient: 1\n"
            "logLevel: loud\n"
        )
        error = self.problems(text)
        self.assertEqual(
            str(error),
            "c.yaml: 6 problems:\n"
            "c.yaml: models.a.ttl: expected a number, got str 'ten'\n"
            "c.yaml: models.b.aliasses: unknown key (did you mean 'aliases'?)\n"
            "c.yaml: groups.g.members[1]: unknown model 'zzz' (known models: c, a, b)\n"
            "c.yaml: scheduler.maxWait: only the 'collate' policy uses it\n"
            "c.yaml: connections.perClient: unknown key (did you mean 'maxPerClient'?)\n"
            "c.yaml: logLevel: must be one of debug, info, warn, error, got 'loud'",
        )
        self.assertEqual(error.path, "")  # the file as a whole; each problem has its own
        self.assertEqual(
            [problem.path for problem in error.problems],
            [
                "models.a.ttl",
                "models.b.aliasses",
                "groups.g.members[1]",
                "scheduler.maxWait",
                "connections.perClient",
                "logLevel",
            ],
        )

    def test_every_problem_of_a_model_entry_is_said_at_once(self) -> None:
        # before: only models.a.aliasses; the next run said the ttl, and so on
        error = self.problems(
            "models:\n  a:\n" + MODEL + "    ttl: ten\n    aliasses: [x]\n"
            "    env: [NO SPACE=1]\n    proxy: ftp://h\n    capabilities: [draw]\n"
            "apiKeys:\n  - {name: k, key: sk-one, maxConcurrent: many, models: 3}\n"
        )
        self.assertEqual(
            [str(problem) for problem in error.problems],
            [
                "c.yaml: models.a.aliasses: unknown key (did you mean 'aliases'?)",
                "c.yaml: models.a.ttl: expected a number, got str 'ten'",
                "c.yaml: models.a.proxy: expected an http:// URL, got 'ftp://h'",
                "c.yaml: models.a.env[0]: expected NAME=value (NAME: letters, digits, _), "
                "got the name 'NO SPACE'",
                "c.yaml: models.a.capabilities[0]: must be one of chat, embeddings, rerank, "
                "got 'draw'",
                # other entries (apiKeys) still say their first problem
                "c.yaml: apiKeys[0].models: expected a list of strings, got int 3",
            ],
        )

    def test_a_model_without_a_usable_cmd_says_so_and_its_other_problems(self) -> None:
        error = self.problems("models:\n  a:\n    ttl: ten\n  b:\n    cmd: ''\n    ttl: -1\n")
        self.assertEqual(
            [str(problem) for problem in error.problems],
            [
                "c.yaml: models.a.ttl: expected a number, got str 'ten'",
                "c.yaml: models.a.cmd: required key is missing",
                "c.yaml: models.b.ttl: must be 0 (never) or a positive number, got -1.0",
                "c.yaml: models.b.cmd: the command is empty",
            ],
        )
        # a proxy with ${PORT} is not blamed on a command that is wrong already
        error = self.problems("models:\n  a:\n    cmd: 'x \"'\n")
        self.assertEqual(len(error.problems), 1, str(error))

    def test_a_reference_to_an_entry_that_failed_is_no_second_problem(self) -> None:
        text = (
            "models:\n  a:\n" + MODEL + "    ttl: ten\n    aliases: [alpha]\n"
            "  b:\n" + MODEL + ""
            "groups:\n  g:\n    members: [a, b]\n"
            "profiles:\n  p: [a, b]\n  broken: nothing\n"
            "pools:\n  q: {models: [a]}\n"
            "hooks:\n  on_startup:\n    preload: [alpha]\n"
            "defaultModel: broken:a\n"
        )
        error = self.problems(text)
        self.assertEqual(
            [str(problem) for problem in error.problems],
            [
                "c.yaml: models.a.ttl: expected a number, got str 'ten'",
                "c.yaml: profiles.broken: expected a list of strings, got str 'nothing'",
            ],
        )
        # alone, the model's problem reads as it always did
        alone = self.problems(text.replace("  broken: nothing\n", "").replace("broken:a", "p:a"))
        self.assertEqual(str(alone), "c.yaml: models.a.ttl: expected a number, got str 'ten'")

    def test_what_a_broken_part_would_make_meaningless_is_not_checked(self) -> None:
        groups = "groups:\n  g:\n    members: [zz]\n"
        # no models map: every reference would be unknown
        error = self.problems("models: 3\n" + groups + "logLevel: loud\n")
        self.assertEqual([p.path for p in error.problems], ["models", "logLevel"])
        self.assertEqual(
            str(self.problems(f"modelsDir: {self.mktemp()}\n" + groups)).count("\n"), 0
        )
        # a macro that fails: its use is not checked (each would be "unknown"), the
        # rest is
        error = self.problems(
            "macros:\n  x: ${nope}\nmodels:\n  a:\n    cmd: s ${x} ${PORT}\n    ttl: ten\ncmnd: 1\n"
        )
        self.assertEqual([p.path for p in error.problems], ["macros.x", "models.a.ttl", "cmnd"])

    def test_a_broken_macro_hides_no_other_problem(self) -> None:
        text = (
            "macros:\n"
            "  bad: ${env.LLAMASWAP_TEST_UNSET}\n"
            "  uses-bad: --x ${bad}\n"  # fails with it: said once
            "  fine: --threads 4\n"
            "models:\n"
            "  a:\n    cmd: s --port ${PORT} ${bad}\n"  # uses it: not checked
            "  b:\n    cmd: s --port ${PORT} ${fine}\n    ttl: ten\n"
            "  c:\n    cmd: s --port ${PORT} ${typo}\n"
            "groups:\n  g:\n    members: [a, b, zzz]\n"  # a failed: no second problem
            "logLevel: loud\n"
        )
        error = self.problems(text)
        # before: only the first line, the rest waited for the next run
        self.assertEqual(
            [str(p) for p in error.problems],
            [
                "c.yaml: macros.bad: ${env.LLAMASWAP_TEST_UNSET}: environment variable "
                "LLAMASWAP_TEST_UNSET is not set",
                "c.yaml: models.b.ttl: expected a number, got str 'ten'",
                "c.yaml: models.c.cmd: unknown macro ${typo} (defined: fine)",
                "c.yaml: groups.g.members[2]: unknown model 'zzz' (known models: a, b, c)",
                "c.yaml: logLevel: must be one of debug, info, warn, error, got 'loud'",
            ],
        )
        # a macros section that is no map: every use of a macro goes unchecked
        error = self.problems(
            "macros: [x]\nmodels:\n  a:\n    cmd: s --port ${PORT} ${x}\nlogLevel: loud\n"
        )
        self.assertEqual([p.path for p in error.problems], ["macros", "logLevel"])

    def test_a_hint_lists_each_model_name_once(self) -> None:
        error = self.problems(
            "models:\n  a:\n" + MODEL + "    aliases: [b, c]\n"
            "  b:\n" + MODEL + "    aliases: [c]\n"
            "defaultModel: zzzzzz\n"
        )
        self.assertEqual(
            [str(problem) for problem in error.problems],
            [
                "c.yaml: models.a.aliases[0]: alias 'b' is already a model id",
                # before: (known models: a, b, b, c, c)
                "c.yaml: defaultModel: unknown model 'zzzzzz' (known models: a, b, c)",
            ],
        )

    def test_several_problems_never_echo_a_key(self) -> None:
        error = self.problems(
            "models:\n  a:\n" + MODEL + "    upstreamApiKey: sk-up stream\n"
            "apiKeys:\n  - sk-has space\n  - sk-same\n  - sk-same\n"
            "  - {name: n, key: sk-also space, models: ['*']}\n"
            "peers:\n  p: {proxy: 'ftp://h', models: [m], apiKey: sk-peer}\n"
        )
        self.assertEqual(
            [p.path for p in error.problems],
            [
                "models.a.upstreamApiKey",
                "apiKeys[0]",
                "apiKeys[2]",
                "apiKeys[3].key",
                "peers.p.proxy",
            ],
        )
        self.assertNotIn("sk-", str(error))


class ShippedConfigTests(SynchronousTestCase):
    def test_example_config_is_valid(self) -> None:
        config = load_config(ROOT / "config.example.yaml")
        self.assertTrue(config.models)


class ModelManagementConfigTests(SynchronousTestCase):
    BASE = "models:\n  a:\n    cmd: s --port ${PORT}\n  b:\n    cmd: s --port ${PORT}\n"

    def error(self, text: str) -> str:
        return str(self.assertRaises(ConfigError, parse_config, text, "conf.yaml"))

    def test_groups_and_the_implicit_default_group(self) -> None:
        config = parse_config(
            self.BASE + "  c:\n    cmd: s --port ${PORT}\n"
            "groups:\n  g:\n    members: [a, b]\n    swap: false\n    persistent: true\n"
        )
        group = config.group_of("a")
        self.assertEqual(
            (group.id, group.swap, group.exclusive, group.persistent), ("g", False, True, True)
        )
        default = config.group_of("c")
        self.assertEqual((default.id, default.members, default.swap), ("(default)", ("c",), True))

    def test_group_errors(self) -> None:
        self.assertIn(
            "groups.g.members[1]: unknown model 'x'",
            self.error(self.BASE + "groups:\n  g:\n    members: [a, x]\n"),
        )
        self.assertIn(
            "groups.h.members[0]: 'a' is already a member of group 'g'",
            self.error(self.BASE + "groups:\n  g:\n    members: [a]\n  h:\n    members: [a]\n"),
        )
        self.assertIn(
            "groups.g.members[1]: 'a' is listed twice",
            self.error(self.BASE + "groups:\n  g:\n    members: [a, a]\n"),
        )
        self.assertIn(
            "groups.g.exclusve: unknown key (did you mean 'exclusive'?)",
            self.error(self.BASE + "groups:\n  g:\n    members: [a]\n    exclusve: false\n"),
        )

    def test_profiles_preload_and_lookup(self) -> None:
        config = parse_config(
            self.BASE + "profiles:\n  duo: [a, b]\nhooks:\n  on_startup:\n    preload: [b]\n"
        )
        self.assertEqual(config.profiles["duo"], ("a", "b"))
        self.assertEqual(config.preload, ("b",))
        found = config.lookup("duo:b")
        assert found is not None
        self.assertEqual((found[0].id, found[1]), ("b", "duo"))
        self.assertIsNone(config.lookup("duo:nope"))
        self.assertIn(
            "profiles.duo[1]: unknown model 'x'",
            self.error(self.BASE + "profiles:\n  duo: [a, x]\n"),
        )
        self.assertIn(
            "hooks.on_startup.preload[0]: unknown model 'zz'",
            self.error(self.BASE + "hooks:\n  on_startup:\n    preload: [zz]\n"),
        )

    def test_filters_and_variants(self) -> None:
        config = parse_config(
            "macros:\n  temp: 0.2\n"
            "models:\n  a:\n    cmd: s --port ${PORT}\n"
            "    filters:\n"
            "      stripParams: 'top_k, model, extra.deep'\n"
            "      setParams: {temperature: '${temp}', stop: ['</s>']}\n"
            "      setParamsByID:\n"
            "        ${MODEL_ID}-think: {reasoning: true}\n"
        )
        model = config.models["a"]
        self.assertEqual(model.filters.strip, ("top_k", "extra.deep"))
        self.assertEqual(model.names, ("a-think",))
        self.assertIs(config.resolve("a-think"), model)
        document = {"model": "a-think", "top_k": 5, "extra": {"deep": 1, "keep": 2}}
        self.assertTrue(model.filters.apply(document, "a-think"))
        self.assertEqual(
            document,
            {
                "model": "a-think",
                "extra": {"keep": 2},
                "temperature": 0.2,
                "stop": ["</s>"],
                "reasoning": True,
            },
        )
        self.assertIn(
            "models.a.filters.setParams.model: filters never change 'model'",
            self.error(
                "models:\n  a:\n    cmd: s --port ${PORT}\n"
                "    filters:\n      setParams: {model: x}\n"
            ),
        )

    def test_model_macros_metadata_and_limits(self) -> None:
        config = parse_config(
            "globalTTL: 60\nmacros:\n  ctx: 4096\nmodels:\n  a:\n"
            "    macros:\n      ctx: 8192\n      args: -c ${ctx}\n"
            "    cmd: s --port ${PORT} ${args}\n"
            "    metadata: {family: '${MODEL_ID}', sizes: [1, 2]}\n"
            "    concurrencyLimit: 3\n"
        )
        model = config.models["a"]
        self.assertEqual(model.cmd.render(1), ["s", "--port", "1", "-c", "8192"])
        self.assertEqual(model.metadata, {"family": "a", "sizes": [1, 2]})
        self.assertEqual((model.ttl, model.concurrency_limit), (60, 3))
        self.assertIn(
            "models.a.concurrencyLimit: must be at least 1",
            self.error("models:\n  a:\n    cmd: s --port ${PORT}\n    concurrencyLimit: 0\n"),
        )
        self.assertIn("globalTTL: must be 0", self.error("globalTTL: -1\n" + self.BASE))
        self.assertIn(
            "models.a.macros.x: unknown macro ${y}",
            self.error("models:\n  a:\n    cmd: s --port ${PORT}\n    macros:\n      x: ${y}\n"),
        )


def own_address() -> str | None:
    """A non-loopback address of this machine, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent for a UDP connect
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if address.startswith("127.") else address


class SelfProxyTests(SynchronousTestCase):
    """A ``proxy`` leading back to llamaswap's own ``--listen`` is refused at load."""

    def config(self, proxy: str, where: str = "model") -> Any:
        if where == "model":
            return parse_config(
                f"models:\n  m:\n    cmd: s --port ${{PORT}}\n    proxy: {proxy}\n", "c.yaml"
            )
        return parse_config(
            f"models:\n  m:\n    cmd: s --port ${{PORT}}\npeers:\n  p:\n    proxy: {proxy}\n"
            "    models: [x]\n",
            "c.yaml",
        )

    def refused(self, proxy: str, listen: str, where: str = "model") -> bool:
        config = self.config(proxy, where)
        try:
            refuse_self_proxy(config, [listen])
        except ConfigError:
            return True
        return False

    def test_the_error_names_the_key_the_url_and_the_endpoint(self) -> None:
        config = self.config("http://localhost:8080")
        error = self.assertRaises(
            ConfigError, refuse_self_proxy, config, ["unix:/run/l.sock", "tcp:8080"]
        )
        self.assertEqual(error.path, "models.m.proxy")
        self.assertIn("http://localhost:8080 is llamaswap's own listen address", str(error))
        self.assertIn("--listen tcp:8080", str(error))
        peer = self.config("http://127.0.0.1:8080/v1", where="peer")
        error = self.assertRaises(ConfigError, refuse_self_proxy, peer, ["tcp:8080"])
        self.assertEqual(error.path, "peers.p.proxy")

    def test_loopback_wildcard_and_port_equivalences(self) -> None:
        loopback = "tcp:8080:interface=127.0.0.1"
        for proxy, listen in [
            ("http://127.0.0.1:8080", loopback),
            ("http://localhost:8080", loopback),
            ("http://LOCALHOST:8080/", loopback),
            ("http://0.0.0.0:8080", loopback),
            ("http://[::ffff:127.0.0.1]:8080", loopback),
            ("http://127.0.0.1:8080", "tcp:8080"),
            ("http://127.0.0.5:8080", "tcp:port=8080:interface=0.0.0.0"),
            ("http://[::1]:8080", "tcp6:8080"),
            ("http://localhost:8080", "tcp6:8080:interface=\\:\\:1"),
            ("http://[::]:8080", "tcp6:port=8080:interface=\\:\\:1"),
            ("http://localhost", "tcp:80"),
            ("https://localhost", "ssl:443:privateKey=k.pem"),
        ]:
            self.assertTrue(self.refused(proxy, listen), (proxy, listen))
            self.assertTrue(self.refused(proxy, listen, where="peer"), (proxy, listen))

    def test_every_spelling_the_resolver_takes_for_loopback(self) -> None:
        # the resolver (inet_aton) reads these as 127.0.0.1; *.localhost is loopback
        # (RFC 6761), and a trailing dot names the same host
        loopback = "tcp:8080:interface=127.0.0.1"
        for proxy in [
            "http://127.1:8080",
            "http://2130706433:8080",
            "http://0x7f000001:8080",
            "http://0x7f.1:8080",
            "http://0177.0.0.1:8080",
            "http://127.000.000.001:8080",
            "http://localhost.:8080",
            "http://model.localhost:8080",
            "http://127.0.0.1.:8080",
        ]:
            self.assertTrue(self.refused(proxy, loopback), proxy)
            self.assertTrue(self.refused(proxy, "tcp:8080"), proxy)

    def test_other_ports_addresses_and_run_time_ports_pass(self) -> None:
        for proxy, listen in [
            ("http://127.0.0.1:8081", "tcp:8080"),
            ("http://127.0.0.2:8080", "tcp:8080:interface=127.0.0.1"),
            ("http://127.0.0.1:8080", "tcp6:8080:interface=\\:\\:1"),
            ("http://192.0.2.7:8080", "tcp:8080"),  # not this machine (TEST-NET-1)
            ("http://gpu-box:8080", "tcp:8080"),  # names are not resolved: the Via mark's job
            ("http://localhost:8080", "unix:/run/llamaswap.sock"),
            ("https://localhost:8080", "tcp:443"),
        ]:
            self.assertFalse(self.refused(proxy, listen), (proxy, listen))
        self.assertFalse(self.refused("http://127.0.0.1:${PORT}", "tcp:8080"))

    def test_an_address_of_this_machine_meets_a_listener_on_every_address(self) -> None:
        address = own_address()
        if address is None:
            raise self.skipTest("this machine has no non-loopback IPv4 address")
        self.assertTrue(self.refused(f"http://{address}:8080", "tcp:8080"))
        self.assertFalse(self.refused(f"http://{address}:8080", "tcp:8080:interface=127.0.0.1"))


class SelfProxyAtStartAndReload(TestCase):
    SELF = "models:\n  m:\n    cmd: s\n    proxy: http://127.0.0.1:9123\n"
    # in memory: the service is never stopped, so a state directory would stay locked
    OTHER = (
        "store: {path: ':memory:'}\nmodels:\n  m:\n    cmd: s\n    proxy: http://127.0.0.1:9124\n"
    )

    def options(self, text: str) -> tuple[Options, Path]:
        path = Path(self.mktemp())
        path.write_text(text)
        options = Options()
        options.parseOptions(["--config", str(path), "--listen", "tcp:9123:interface=127.0.0.1"])
        return options, path

    def test_startup_refuses_it(self) -> None:
        path = Path(self.mktemp())
        path.write_text(self.SELF)
        error = self.assertRaises(
            InvalidConfig, Options().parseOptions, ["--config", str(path), "--listen", "tcp:9123"]
        )
        self.assertIn(
            f"{path}: models.m.proxy: http://127.0.0.1:9123 is llamaswap's own", str(error)
        )
        self.assertEqual(len(load_config(path).models), 1)  # without listen: no opinion

    async def test_reload_refuses_it_and_keeps_the_running_config(self) -> None:
        options, path = self.options(self.OTHER)
        service = makeService(options, reactor)
        reloader = next(s for s in service if isinstance(s, ConfigReloader))  # type: ignore[attr-defined]
        reloader.on_signal = False
        applied: list[Any] = []

        def apply(config: Any) -> dict[str, list[str]]:
            applied.append(config)
            return {}

        reloader.apply = apply
        path.write_text(self.SELF)
        self.assertFalse(await reloader.reload())
        self.assertEqual(applied, [])
        path.write_text(self.OTHER.replace("9124", "9125"))
        self.assertTrue(await reloader.reload())
        self.assertEqual(len(applied), 1)
