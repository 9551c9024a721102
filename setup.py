# Reads settings.ini (the nbdev 2 way) without pkg_resources, which current setuptools no longer ships.
from configparser import ConfigParser
import shlex
import setuptools

cfg = ConfigParser(delimiters=['='])
cfg.read('settings.ini', encoding='utf-8')
c = cfg['DEFAULT']

licenses = {'apache2': 'Apache-2.0'}  # SPDX expression (license classifiers are deprecated in setuptools)
statuses = ['Planning', 'Pre-Alpha', 'Alpha', 'Beta', 'Production/Stable', 'Mature', 'Inactive']
lic = licenses[c['license']]
reqs = shlex.split(c.get('requirements', ''))
dev_reqs = shlex.split(c.get('dev_requirements', ''))
scripts = c.get('console_scripts', '').split()

setuptools.setup(
    name=c['lib_name'], version=c['version'], description=c['description'],
    license=lic, author=c['author'], author_email=c['author_email'],
    keywords=c['keywords'], url=c['git_url'],
    classifiers=[f"Development Status :: {c['status']} - {statuses[int(c['status'])]}",
                 f"Intended Audience :: {c['audience']}",
                 f"Natural Language :: {c['language']}", 'Programming Language :: Python :: 3'],
    packages=setuptools.find_packages(include=[c['lib_path'], c['lib_path'] + '.*']),
    include_package_data=True, install_requires=reqs, extras_require={'dev': dev_reqs},
    package_data={c['lib_path']: ['classes/*.txt', 'classes/*/*.txt', 'recipes/*.yaml']},   # class-name files, training recipes
    python_requires='>=' + c['min_python'],
    long_description=open('README.md', encoding='utf-8').read(), long_description_content_type='text/markdown',
    zip_safe=False, entry_points={'console_scripts': scripts, 'nbdev': [f"{c['lib_path']}={c['lib_path']}._modidx:d"]},
)
