"""The import graph: no module imports itself through others (imports inside functions count).

The layer contracts are in pyproject.toml ([tool.importlinter]); bin/test runs `lint-imports`.
"""

from __future__ import annotations

import grimp

PACKAGES = ("agentsite", "skills", "orchestration")


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if graph.chain_exists(importer=imported, imported=module):
                chain = graph.find_shortest_chain(importer=imported, imported=module) or ()
                cycles.append(" -> ".join([module, *chain]))
    assert cycles == []


def test_imports_inside_functions_are_in_the_graph():
    """orchestration.apps imports the policies in ready(), a function: the check above sees such imports."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert graph.direct_import_exists(importer="orchestration.apps", imported="orchestration.saga")
