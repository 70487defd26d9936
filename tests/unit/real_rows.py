"""Verbatim rows of the real benchmark files (``shared/data``), for unit tests that must run
without the data folder: the fixtures in ``tests/conftest.py`` write them in the real formats."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

HUMANEVAL_ROWS = [  # HumanEval/0-2, verbatim
    {
        'task_id': 'HumanEval/0',
        'prompt': ('from typing import List\n'
                   '\n'
                   '\n'
                   'def has_close_elements(numbers: List[float], threshold: float) -> bool:\n'
                   '    """ Check if in given list of numbers, are any two numbers closer to each other '
                   'than\n'
                   '    given threshold.\n'
                   '    >>> has_close_elements([1.0, 2.0, 3.0], 0.5)\n'
                   '    False\n'
                   '    >>> has_close_elements([1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3)\n'
                   '    True\n'
                   '    """\n'),
        'entry_point': 'has_close_elements',
        'canonical_solution': ('    for idx, elem in enumerate(numbers):\n'
                               '        for idx2, elem2 in enumerate(numbers):\n'
                               '            if idx != idx2:\n'
                               '                distance = abs(elem - elem2)\n'
                               '                if distance < threshold:\n'
                               '                    return True\n'
                               '\n'
                               '    return False\n'),
        'test': ('\n'
                 '\n'
                 'METADATA = {\n'
                 "    'author': 'jt',\n"
                 "    'dataset': 'test'\n"
                 '}\n'
                 '\n'
                 '\n'
                 'def check(candidate):\n'
                 '    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n'
                 '    assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n'
                 '    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n'
                 '    assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.8) == False\n'
                 '    assert candidate([1.0, 2.0, 3.0, 4.0, 5.0, 2.0], 0.1) == True\n'
                 '    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True\n'
                 '    assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n'
                 '\n'),
    },
    {
        'task_id': 'HumanEval/1',
        'prompt': ('from typing import List\n'
                   '\n'
                   '\n'
                   'def separate_paren_groups(paren_string: str) -> List[str]:\n'
                   '    """ Input to this function is a string containing multiple groups of nested '
                   'parentheses. Your goal is to\n'
                   '    separate those group into separate strings and return the list of those.\n'
                   '    Separate groups are balanced (each open brace is properly closed) and not nested '
                   'within each other\n'
                   '    Ignore any spaces in the input string.\n'
                   "    >>> separate_paren_groups('( ) (( )) (( )( ))')\n"
                   "    ['()', '(())', '(()())']\n"
                   '    """\n'),
        'entry_point': 'separate_paren_groups',
        'canonical_solution': ('    result = []\n'
                               '    current_string = []\n'
                               '    current_depth = 0\n'
                               '\n'
                               '    for c in paren_string:\n'
                               "        if c == '(':\n"
                               '            current_depth += 1\n'
                               '            current_string.append(c)\n'
                               "        elif c == ')':\n"
                               '            current_depth -= 1\n'
                               '            current_string.append(c)\n'
                               '\n'
                               '            if current_depth == 0:\n'
                               "                result.append(''.join(current_string))\n"
                               '                current_string.clear()\n'
                               '\n'
                               '    return result\n'),
        'test': ('\n'
                 '\n'
                 'METADATA = {\n'
                 "    'author': 'jt',\n"
                 "    'dataset': 'test'\n"
                 '}\n'
                 '\n'
                 '\n'
                 'def check(candidate):\n'
                 "    assert candidate('(()()) ((())) () ((())()())') == [\n"
                 "        '(()())', '((()))', '()', '((())()())'\n"
                 '    ]\n'
                 "    assert candidate('() (()) ((())) (((())))') == [\n"
                 "        '()', '(())', '((()))', '(((())))'\n"
                 '    ]\n'
                 "    assert candidate('(()(())((())))') == [\n"
                 "        '(()(())((())))'\n"
                 '    ]\n'
                 "    assert candidate('( ) (( )) (( )( ))') == ['()', '(())', '(()())']\n"),
    },
    {
        'task_id': 'HumanEval/2',
        'prompt': ('\n'
                   '\n'
                   'def truncate_number(number: float) -> float:\n'
                   '    """ Given a positive floating point number, it can be decomposed into\n'
                   '    and integer part (largest integer smaller than given number) and decimals\n'
                   '    (leftover part always smaller than 1).\n'
                   '\n'
                   '    Return the decimal part of the number.\n'
                   '    >>> truncate_number(3.5)\n'
                   '    0.5\n'
                   '    """\n'),
        'entry_point': 'truncate_number',
        'canonical_solution': '    return number % 1.0\n',
        'test': ('\n'
                 '\n'
                 'METADATA = {\n'
                 "    'author': 'jt',\n"
                 "    'dataset': 'test'\n"
                 '}\n'
                 '\n'
                 '\n'
                 'def check(candidate):\n'
                 '    assert candidate(3.5) == 0.5\n'
                 '    assert abs(candidate(1.33) - 0.33) < 1e-6\n'
                 '    assert abs(candidate(123.456) - 0.456) < 1e-6\n'),
    },
]
GSM8K_ROWS = [  # GSM8K test lines 1, 231 (thousands separators) and 490 (negative answer), verbatim
    {
        'question': ('Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and '
                     'bakes muffins for her friends every day with four. She sells the remainder at the '
                     "farmers' market daily for $2 per fresh duck egg. How much in dollars does she make "
                     "every day at the farmers' market?"),
        'answer': ('Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n'
                   'She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer’s market.\n'
                   '#### 18'),
    },
    {
        'question': ('Mark buys a fleet of 12 cars for his company.  Each car sells for $20,000.  He pays '
                     '10% tax on the cars and then another $1000 for registration on each of them.  How much '
                     'does he pay for everything?'),
        'answer': ('The cars cost 20000*12=$<<20000*12=240000>>240,000\n'
                   'So the tax came out to 240,000*.1=$<<240000*.1=24000>>24,000\n'
                   'So the cars cost 240,000+24,000=$<<240000+24000=264000>>264,000\n'
                   'Registration cost another 12*1000=<<12*1000=12000>>12,000\n'
                   'So his total cost is 264,000+12,000=$<<264000+12000=276000>>276,000\n'
                   '#### 276,000'),
    },
    {
        'question': ('The highest temperature ever recorded in Southlandia is -48 degrees Fahrenheit. The '
                     'highest temperature ever recorded in Northlandia is 21 degrees Fahrenheit. The highest '
                     'temperature recorded in Midlandia is -3 degrees Fahrenheit. What is the average '
                     'highest temperature of these 3 countries?'),
        'answer': ('-48 + 21 + (-3) = <<-48+21+(-3)=-30>>-30\n'
                   '-30/3 = <<-30/3=-10>>-10 degrees\n'
                   'The average highest temperature recorded in Southlandia, Northlandia, and Midlandia is '
                   '-10 degrees Fahrenheit.\n'
                   '#### -10'),
    },
]


def write_humaneval_gz(path: Path) -> Path:
    """``HUMANEVAL_ROWS`` as ``HumanEval.jsonl.gz`` is distributed: gzip-compressed JSON Lines."""
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in HUMANEVAL_ROWS)
    return path


def write_gsm8k_jsonl(path: Path) -> Path:
    """``GSM8K_ROWS`` as GSM8K's ``test.jsonl``: one ``{"question", "answer"}`` object a line."""
    path.write_text("".join(json.dumps(row) + "\n" for row in GSM8K_ROWS), encoding="utf-8")
    return path
