"""The province as data: tiers, sectors, agencies, procedures, places, names and phone numbers.

Figures come from `shared/seed/FACTS.md` (Khánh Hòa, report 1617/BC-SNV, first half of 2019).
Agency codes follow the national agency-code shape (`000.00.12.H34`: H34 is Khánh Hòa); the
procedure codes have the national database's shape (`1.004227`). Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Tier = Literal["province", "district", "commune", "vertical"]


@dataclass(frozen=True, slots=True)
class Procedure:
    code: str
    name: str
    days: int  # the time limit in working days (Decree 61/2018), at least 1
    level: Literal[3, 4] | None  # online service level; None = not offered online
    fee_vnd: int


@dataclass(frozen=True, slots=True)
class Sector:
    key: str  # what `dossier.submitted.data.sector` carries
    name: str
    weight: int  # resolved dossiers in the half-year at scale 1 (a proportion for "free" sectors)
    late_rate: float | None  # fixed by FACTS, else None (takes a share of the remaining late)
    late_weight: float  # how the remaining late dossiers are shared among the free sectors
    online_share: float  # how the remaining online dossiers are shared (weight x size)
    tiers: tuple[tuple[Tier, float], ...]  # where its dossiers are filed, by share
    procedures: tuple[Procedure, ...]


@dataclass(frozen=True, slots=True)
class Agency:
    code: str
    name: str
    tier: Tier
    sectors: tuple[str, ...]
    district: str | None = None  # for district and commune agencies


@dataclass(frozen=True, slots=True)
class Named:
    """One of the five agencies with the highest online share (FACTS): online / all dossiers."""

    agency_code: str
    label: str
    online: int
    all: int


def _p(code: str, name: str, days: int, level: Literal[3, 4] | None, fee: int) -> Procedure:
    return Procedure(code, name, days, level, fee)


# The three sectors FACTS fixes a late rate for, sized so that the rate holds at two decimals
# at scale 1 (553/4,400 = 12.57 %, 6,540/60,000 = 10.90 %, 200/14,000 = 1.43 %).
CONSTRUCTION, LAND, LABOUR = "construction", "land", "labour_invalids_social_affairs"

SECTORS: Final[tuple[Sector, ...]] = (
    Sector(CONSTRUCTION, "Xây dựng", 4_400, 0.1257, 0, 0.10,
           (("province", 0.4), ("district", 0.6)),
           (_p("1.009972", "Cấp giấy phép xây dựng nhà ở riêng lẻ", 15, 3, 75_000),
            _p("1.009988", "Cấp chứng chỉ hành nghề hoạt động xây dựng", 20, 3, 300_000),
            _p("1.009794", "Thẩm định thiết kế xây dựng triển khai sau thiết kế cơ sở", 20, None,
               0))),
    Sector(LAND, "Đất đai", 60_000, 0.1090, 0, 0.03,
           (("district", 1.0),),
           (_p("1.004227", "Đăng ký biến động quyền sử dụng đất, quyền sở hữu tài sản", 10, None,
               50_000),
            _p("1.003003", "Cấp giấy chứng nhận quyền sử dụng đất lần đầu", 30, None, 100_000),
            _p("1.001991", "Đăng ký thế chấp quyền sử dụng đất", 3, 3, 80_000),
            _p("1.002273", "Chuyển mục đích sử dụng đất", 15, None, 0))),
    Sector(LABOUR, "Lao động - Thương binh và Xã hội", 14_000, 0.0143, 0, 0.06,
           (("province", 0.2), ("district", 0.3), ("commune", 0.5)),
           (_p("1.001776", "Giải quyết trợ cấp xã hội hàng tháng", 20, None, 0),
            _p("1.000459", "Cấp giấy phép lao động cho người lao động nước ngoài", 5, 3, 600_000),
            _p("1.002519", "Giải quyết chế độ ưu đãi người có công", 12, None, 0))),
    Sector("justice", "Tư pháp", 70_000, None, 3, 0.08,
           (("province", 0.15), ("district", 0.15), ("commune", 0.7)),
           (_p("1.001193", "Đăng ký khai sinh", 1, 3, 0),
            _p("1.000894", "Đăng ký kết hôn", 3, None, 0),
            _p("1.000656", "Đăng ký khai tử", 1, None, 0),
            _p("2.000908", "Chứng thực bản sao từ bản chính", 1, None, 2_000),
            _p("2.000488", "Cấp phiếu lý lịch tư pháp", 10, 3, 200_000))),
    Sector("planning_investment", "Kế hoạch và Đầu tư", 25_000, None, 2, 0.55,
           (("province", 0.7), ("district", 0.3)),
           (_p("2.001610", "Đăng ký thành lập doanh nghiệp", 3, 4, 100_000),
            _p("2.002025", "Đăng ký thay đổi nội dung đăng ký doanh nghiệp", 3, 4, 100_000),
            _p("2.000575", "Đăng ký thành lập hộ kinh doanh", 3, 3, 100_000))),
    Sector("transport", "Giao thông vận tải", 40_000, None, 1, 0.22,
           (("province", 1.0),),
           (_p("1.002804", "Đổi giấy phép lái xe do ngành Giao thông vận tải cấp", 5, 3, 135_000),
            _p("1.002856", "Cấp phù hiệu xe ô tô kinh doanh vận tải", 2, 4, 0),
            _p("1.001755", "Cấp giấy phép lái xe quốc tế", 5, 3, 135_000))),
    Sector("health", "Y tế", 12_000, None, 4, 0.25,
           (("province", 1.0),),
           (_p("1.004613", "Cấp chứng chỉ hành nghề khám bệnh, chữa bệnh", 30, 3, 360_000),
            _p("1.002425", "Cấp giấy chứng nhận cơ sở đủ điều kiện an toàn thực phẩm", 15, 3,
               500_000))),
    Sector("education", "Giáo dục và Đào tạo", 6_000, None, 1, 0.2,
           (("province", 0.5), ("district", 0.5)),
           (_p("1.005092", "Công nhận văn bằng tốt nghiệp do cơ sở nước ngoài cấp", 10, None, 0),
            _p("1.005088", "Cấp bản sao văn bằng, chứng chỉ từ sổ gốc", 1, 3, 10_000))),
    Sector("home_affairs", "Nội vụ", 3_000, None, 2, 0.15,
           (("province", 0.6), ("district", 0.4)),
           (_p("1.003822", "Thẩm định thành lập hội", 30, None, 0),
            _p("1.000775", "Xét tặng danh hiệu Lao động tiên tiến", 20, 3, 0))),
    Sector("finance", "Tài chính", 5_000, None, 1, 0.5,
           (("province", 1.0),),
           (_p("1.005385", "Cấp mã số đơn vị có quan hệ với ngân sách", 2, 4, 0),)),
    Sector("information_communications", "Thông tin và Truyền thông", 2_000, None, 1, 0.4,
           (("province", 1.0),),
           (_p("1.003888", "Cấp giấy phép xuất bản bản tin", 10, 3, 0),)),
    Sector("science_technology", "Khoa học và Công nghệ", 1_500, None, 1, 0.3,
           (("province", 1.0),),
           (_p("1.003662", "Đăng ký hợp đồng chuyển giao công nghệ", 15, 3, 0),)),
    # the five sectors of the named agencies: sized by their own counts, see NAMED
    Sector("tourism", "Du lịch", 394, None, 0.5, 0.0,
           (("province", 1.0),),
           (_p("1.001432", "Cấp thẻ hướng dẫn viên du lịch quốc tế", 15, 4, 650_000),
            _p("1.004580", "Cấp giấy phép kinh doanh dịch vụ lữ hành nội địa", 10, 4, 3_000_000),
            _p("1.001440", "Công nhận hạng cơ sở lưu trú du lịch", 30, 3, 1_500_000))),
    Sector("agriculture", "Nông nghiệp và Phát triển nông thôn", 6_857, None, 1, 0.0,
           (("province", 1.0),),
           (_p("1.003961", "Cấp giấy chứng nhận kiểm dịch động vật vận chuyển", 1, 4, 40_000),
            _p("1.003983", "Cấp giấy phép khai thác thủy sản", 8, 3, 40_000),
            _p("1.001850", "Cấp giấy chứng nhận cơ sở đủ điều kiện an toàn thực phẩm nông lâm "
               "thủy sản", 15, None, 700_000))),
    Sector("natural_resources_environment", "Tài nguyên và Môi trường", 4_433, None, 2, 0.0,
           (("province", 1.0),),
           (_p("1.004223", "Xác nhận kế hoạch bảo vệ môi trường", 10, 3, 0),
            _p("1.001740", "Cấp giấy phép khai thác nước dưới đất", 30, 3, 1_200_000),
            _p("1.004249", "Thẩm định báo cáo đánh giá tác động môi trường", 30, None, 5_000_000))),
    Sector("industry_trade", "Công Thương", 4_627, None, 1, 0.0,
           (("province", 1.0),),
           (_p("2.000633", "Xác nhận đăng ký thực hiện khuyến mại", 5, 4, 0),
            _p("2.000620", "Cấp giấy phép bán lẻ sản phẩm rượu", 10, 3, 1_200_000),
            _p("2.000181", "Cấp giấy phép kinh doanh bán buôn sản phẩm thuốc lá", 15, None,
               2_500_000))),
    Sector("culture_sports", "Văn hóa và Thể thao", 653, None, 1, 0.0,
           (("province", 1.0),),
           (_p("1.001029", "Cấp giấy phép tổ chức biểu diễn nghệ thuật", 5, 3, 0),
            _p("1.001809", "Cấp giấy phép kinh doanh dịch vụ karaoke", 5, 3, 4_000_000),
            _p("1.000968", "Đăng ký tổ chức lễ hội", 10, None, 0))),
    # vertical branches: only in the live stream (the replay covers departments, districts and
    # communes, as the report's figures do)
    Sector("police", "Công an", 0, None, 0, 0.9,
           (("vertical", 1.0),),
           (_p("1.001997", "Đăng ký thường trú", 3, 3, 15_000),
            _p("1.000047", "Xóa đăng ký thường trú", 2, 3, 0))),
    Sector("social_insurance", "Bảo hiểm xã hội", 0, None, 0, 0.56,
           (("vertical", 1.0),),
           (_p("1.000275", "Cấp thẻ bảo hiểm y tế cho trẻ em dưới 6 tuổi", 3, 4, 0),)),
    Sector("tax", "Thuế", 0, None, 0, 0.6,
           (("vertical", 1.0),),
           (_p("1.000711", "Khai thuế thu nhập cá nhân", 3, 4, 0),)),
)  # fmt: skip

SECTOR_BY_KEY: Final = {s.key: s for s in SECTORS}
REPLAY_SECTORS: Final = tuple(s for s in SECTORS if s.weight > 0)

# The districts of Khánh Hòa with some of their communes (wards, towns) — addresses use all;
# Trường Sa has no committee on the system (FACTS: 8 district people's committees).
DISTRICTS: Final[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
    ("21", "Nha Trang", ("Lộc Thọ", "Vĩnh Hải", "Vĩnh Phước", "Vĩnh Thọ", "Xương Huân",
                         "Vạn Thắng", "Phước Hải", "Phước Long", "Tân Lập", "Phương Sài",
                         "Ngọc Hiệp", "Vĩnh Nguyên", "Vĩnh Trường", "Phước Tân", "Vĩnh Hiệp")),
    ("22", "Cam Ranh", ("Cam Nghĩa", "Cam Phúc Bắc", "Cam Phúc Nam", "Cam Lộc", "Cam Phú",
                        "Ba Ngòi", "Cam Thuận", "Cam Lợi", "Cam Linh", "Cam Thành Nam")),
    ("23", "Ninh Hòa", ("Ninh Hiệp", "Ninh Diêm", "Ninh Đa", "Ninh Giang", "Ninh Hà",
                        "Ninh Xuân", "Ninh Sơn", "Ninh Phụng")),
    ("24", "Vạn Ninh", ("Vạn Giã", "Vạn Thắng", "Vạn Phú", "Vạn Lương", "Vạn Hưng", "Đại Lãnh")),
    ("25", "Diên Khánh", ("Diên Khánh", "Diên An", "Diên Toàn", "Diên Phú", "Suối Hiệp",
                          "Diên Lạc")),
    ("26", "Khánh Vĩnh", ("Khánh Vĩnh", "Khánh Bình", "Khánh Đông", "Sông Cầu")),
    ("27", "Khánh Sơn", ("Tô Hạp", "Sơn Hiệp", "Sơn Bình", "Thành Sơn")),
    ("28", "Cam Lâm", ("Cam Đức", "Cam Hải Đông", "Cam Thành Bắc", "Suối Tân", "Cam Hòa")),
    ("29", "Trường Sa", ("Trường Sa", "Song Tử Tây", "Sinh Tồn")),
)  # fmt: skip
PROVINCE: Final = "Khánh Hòa"
COMMITTEE_DISTRICTS: Final = DISTRICTS[:8]

_DEPARTMENTS: Final[tuple[tuple[str, str, tuple[str, ...]], ...]] = (
    ("01", "Sở Kế hoạch và Đầu tư", ("planning_investment",)),
    ("02", "Sở Tư pháp", ("justice",)),
    ("03", "Sở Lao động - Thương binh và Xã hội", (LABOUR,)),
    ("04", "Sở Giao thông vận tải", ("transport",)),
    ("05", "Sở Y tế", ("health",)),
    ("06", "Sở Giáo dục và Đào tạo", ("education",)),
    ("07", "Sở Nội vụ", ("home_affairs",)),
    ("08", "Sở Tài chính", ("finance",)),
    ("09", "Sở Thông tin và Truyền thông", ("information_communications",)),
    ("10", "Sở Khoa học và Công nghệ", ("science_technology",)),
    ("11", "Sở Du lịch", ("tourism",)),
    ("12", "Sở Xây dựng", (CONSTRUCTION,)),
    ("13", "Sở Nông nghiệp và Phát triển nông thôn", ("agriculture",)),
    ("14", "Sở Tài nguyên và Môi trường", ("natural_resources_environment",)),
    ("15", "Sở Công Thương", ("industry_trade",)),
    ("16", "Sở Văn hóa và Thể thao", ("culture_sports",)),
    ("17", "Sở Ngoại vụ", ()),
    ("18", "Ban Quản lý Khu kinh tế Vân Phong", ("planning_investment", CONSTRUCTION)),
    ("19", "Thanh tra tỉnh", ()),
)
_DISTRICT_SECTORS: Final = (
    LAND,
    CONSTRUCTION,
    LABOUR,
    "justice",
    "planning_investment",
    "education",
    "home_affairs",
)
_COMMUNE_SECTORS: Final = (LABOUR, "justice")


def _agencies() -> tuple[Agency, ...]:
    out = [
        Agency(f"000.00.{code}.H34", name, "province", sectors)
        for code, name, sectors in _DEPARTMENTS
    ]
    for code, name, _communes in COMMITTEE_DISTRICTS:
        kind = "Thành phố" if name in ("Nha Trang", "Cam Ranh") else "Huyện"
        kind = "Thị xã" if name == "Ninh Hòa" else kind
        out.append(
            Agency(f"000.00.{code}.H34", f"UBND {kind} {name}", "district", _DISTRICT_SECTORS, name)
        )
    # nine land registration branch offices, one per district plus the provincial office's desk
    for index, (code, name, _) in enumerate(COMMITTEE_DISTRICTS, start=1):
        out.append(
            Agency(
                f"000.{30 + index:02d}.{code}.H34",
                f"Chi nhánh Văn phòng đăng ký đất đai {name}",
                "district",
                (LAND,),
                name,
            )
        )
    out.append(Agency("000.30.14.H34", "Văn phòng đăng ký đất đai tỉnh", "district", (LAND,)))
    for code, name, communes in COMMITTEE_DISTRICTS:
        for index, commune in enumerate(communes, start=1):
            out.append(
                Agency(
                    f"000.{index:02d}.{code}.H34",
                    f"UBND xã/phường {commune}",
                    "commune",
                    _COMMUNE_SECTORS,
                    name,
                )
            )
    out.extend(
        [
            Agency("000.00.41.H34", "Công an tỉnh Khánh Hòa", "vertical", ("police",)),
            Agency(
                "000.00.42.H34", "Bảo hiểm xã hội tỉnh Khánh Hòa", "vertical", ("social_insurance",)
            ),
            Agency("000.00.43.H34", "Cục Thuế tỉnh Khánh Hòa", "vertical", ("tax",)),
        ]
    )
    return tuple(out)


AGENCIES: Final[tuple[Agency, ...]] = _agencies()
AGENCY_BY_CODE: Final = {a.code: a for a in AGENCIES}

NAMED: Final[tuple[Named, ...]] = (
    Named("000.00.11.H34", "Tourism", 386, 394),
    Named("000.00.13.H34", "Agriculture", 4_763, 6_857),
    Named("000.00.14.H34", "Natural Resources & Environment", 2_429, 4_433),
    Named("000.00.15.H34", "Industry & Trade", 2_505, 4_627),
    Named("000.00.16.H34", "Culture & Sports", 264, 653),
)
NAMED_SECTOR: Final = {
    "000.00.11.H34": "tourism",
    "000.00.13.H34": "agriculture",
    "000.00.14.H34": "natural_resources_environment",
    "000.00.15.H34": "industry_trade",
    "000.00.16.H34": "culture_sports",
}
NAMED_CODES: Final = frozenset(NAMED_SECTOR)
NAMED_SECTORS: Final = frozenset(NAMED_SECTOR.values())


def agencies_for(sector: str, tier: Tier) -> tuple[Agency, ...]:
    """Who files dossiers of a sector at a tier; the named agencies keep their sector to
    themselves (so their counts are theirs alone) and never take part in transfers."""
    if sector in NAMED_SECTORS:
        code = next(c for c, s in NAMED_SECTOR.items() if s == sector)
        return (AGENCY_BY_CODE[code],)
    return tuple(
        a for a in AGENCIES if a.tier == tier and sector in a.sectors and a.code not in NAMED_CODES
    )


# --- people --------------------------------------------------------------------------------------

SURNAMES: Final = (
    "Nguyễn",
    "Trần",
    "Lê",
    "Phạm",
    "Huỳnh",
    "Hoàng",
    "Phan",
    "Võ",
    "Đặng",
    "Bùi",
    "Đỗ",
    "Hồ",
    "Ngô",
    "Dương",
    "Lý",
    "Trương",
    "Đoàn",
    "Lâm",
)
MIDDLE_MALE: Final = ("Văn", "Hữu", "Đức", "Minh", "Quốc", "Thanh", "Công", "Xuân")
MIDDLE_FEMALE: Final = ("Thị", "Ngọc", "Thị Kim", "Thị Thu", "Thanh", "Thị Mỹ", "Bích")
GIVEN_MALE: Final = (
    "An",
    "Bình",
    "Dũng",
    "Hải",
    "Hùng",
    "Khánh",
    "Long",
    "Minh",
    "Nam",
    "Phúc",
    "Quân",
    "Sơn",
    "Tâm",
    "Thắng",
    "Trung",
    "Tuấn",
    "Vinh",
    "Hòa",
    "Lộc",
)
GIVEN_FEMALE: Final = (
    "Châu",
    "Hà",
    "Hạnh",
    "Hoa",
    "Hương",
    "Lan",
    "Linh",
    "Mai",
    "Nga",
    "Phương",
    "Thảo",
    "Trang",
    "Vy",
    "Yến",
    "Nhung",
    "Oanh",
    "Diệp",
)
COMPANY_KINDS: Final = ("Công ty TNHH", "Công ty Cổ phần", "Doanh nghiệp tư nhân", "Hợp tác xã")
COMPANY_WORDS: Final = (
    "Hải Đăng",
    "Biển Xanh",
    "Phú Khánh",
    "Yến Sào",
    "Vân Phong",
    "Hòn Tre",
    "Xanh Nha Trang",
    "Thành Đạt",
    "Cam Ranh Xanh",
)
STREETS: Final = (
    "Trần Phú",
    "Lê Thánh Tôn",
    "Thống Nhất",
    "2 Tháng 4",
    "23 Tháng 10",
    "Nguyễn Thị Minh Khai",
    "Yersin",
    "Hùng Vương",
    "Lê Hồng Phong",
    "Nguyễn Trãi",
    "Quang Trung",
    "Lý Tự Trọng",
    "Phạm Văn Đồng",
    "Hai Bà Trưng",
    "Đường 3 Tháng 4",
    "Nguyễn Tất Thành",
    "Trần Quý Cáp",
    "Lạc Long Quân",
)
OTHER_PROVINCES: Final = (
    ("Phú Yên", "Tuy Hòa", "Phường 1"),
    ("Ninh Thuận", "Phan Rang - Tháp Chàm", "Phủ Hà"),
    ("Lâm Đồng", "Đà Lạt", "Phường 3"),
    ("TP. Hồ Chí Minh", "Quận 1", "Bến Nghé"),
)

# mobile prefixes in 2019 (after the 2018 move to 10 digits) and the old 11-digit ones that
# applicants still wrote on forms; Khánh Hòa's landline area code is 0258
MOBILE_PREFIXES: Final = (
    "090",
    "093",
    "089",
    "070",
    "079",
    "077",
    "076",
    "078",
    "091",
    "094",
    "088",
    "083",
    "084",
    "085",
    "081",
    "082",
    "096",
    "097",
    "098",
    "086",
    "032",
    "033",
    "034",
    "035",
    "036",
    "037",
    "038",
    "039",
    "056",
    "058",
    "059",
)
OLD_MOBILE_PREFIXES: Final = (
    "0162",
    "0163",
    "0164",
    "0165",
    "0166",
    "0167",
    "0168",
    "0169",
    "0120",
    "0121",
    "0122",
    "0126",
    "0128",
    "0123",
    "0124",
    "0125",
    "0127",
    "0129",
    "0186",
    "0188",
    "0199",
)

REJECT_REASONS: Final = (
    "Hồ sơ không thuộc thẩm quyền giải quyết",
    "Thành phần hồ sơ không đúng quy định",
    "Thủ tục đã được thay thế",
)
SUPPLEMENT_REASONS: Final = (
    "Thiếu bản sao giấy tờ tùy thân",
    "Bản vẽ chưa đúng quy cách",
    "Cần bổ sung xác nhận của UBND cấp xã",
    "Thiếu tờ khai có chữ ký",
)
APOLOGY_REASONS: Final = (
    "Cần xác minh thêm thông tin",
    "Chờ ý kiến phối hợp của cơ quan liên quan",
    "Khối lượng hồ sơ tăng đột biến",
)
